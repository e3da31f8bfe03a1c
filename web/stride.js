// Stride's frontend extension: gives Stride's nodes a title colour of their own, so a graph
// shows at a glance which nodes come from the pack. A colour saved in a workflow still wins.
import { app } from "../../scripts/app.js";

const TITLE_COLOUR = "#1d5c63";

app.registerExtension({
    name: "Stride.core",
    nodeCreated(node) {
        const type = node.comfyClass ?? node.type ?? "";
        if (type.startsWith("Stride") && node.color === undefined) {
            node.color = TITLE_COLOUR;
        }
    },
});
