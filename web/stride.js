// Stride's frontend extensions.
// - Stride.core: gives Stride's nodes a title colour of their own, so a graph shows at a glance which
//   nodes come from the pack. A colour saved in a workflow still wins.
// - Stride.sigmaPlot: every node that sends `stride_sigmas` in its UI output (the schedule nodes and the
//   sigma preview, see nodes/schedules.py) gets a small plot of log sigma against the step. The sigmas
//   live on the node (node.strideSigmas) and in a widget that is never serialized: workflows stay clean,
//   and a reloaded page shows the plot again after the next run.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

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

export const SIGMAS_KEY = "stride_sigmas"; // nodes/schedules.py UI_KEY
export const PLOT_WIDGET = "stride_sigma_plot";
const PLOT_HEIGHT = 150; // the widget's height in graph units
const PLOT_MIN_WIDTH = 240;
const PAD = { left: 46, right: 12, top: 20, bottom: 20 }; // around the plot box, inside the widget
export const LINE_COLOUR = "#4fc3f7";
const ZERO_COLOUR = "#ffb74d";
const BOX_COLOUR = "#161616";
const GRID_COLOUR = "#3a3a3a";
const TEXT_COLOUR = "#b0b0b0";

/** The node an execution id names: "12" in the root graph, "5:3" node 3 inside subgraph node 5; else null. */
function nodeByExecutionId(id) {
    let graph = app.rootGraph ?? app.graph;
    const path = String(id).split(":");
    for (const part of path.slice(0, -1)) {
        graph = graph?.getNodeById(part)?.subgraph;
    }
    return graph?.getNodeById(path[path.length - 1]) ?? null;
}

function formatSigma(s) {
    if (s === 0) return "0";
    const a = Math.abs(s);
    return a >= 1000 || a < 0.001 ? s.toExponential(2) : String(Number(s.toPrecision(3)));
}

/**
 * What the plot shows, in plot units: the step of each sigma, log sigma for the positive ones, and
 * the sigmas that are 0 (or not positive), which have no log and are drawn on the bottom edge.
 */
export function plotData(sigmas) {
    const values = (Array.isArray(sigmas) ? sigmas : []).map(Number).filter(Number.isFinite);
    const positive = [];
    const zeros = [];
    values.forEach((s, i) => (s > 0 ? positive : zeros).push({ step: i, sigma: s }));
    const logs = positive.map(p => Math.log(p.sigma));
    let lo = Math.min(...logs);
    let hi = Math.max(...logs);
    if (!positive.length) {
        lo = -1;
        hi = 1;
    } else if (hi - lo < 1e-9) { // one value, or all equal: centre it
        lo -= 1;
        hi += 1;
    }
    return {
        values, positive, zeros, logMin: lo, logMax: hi, steps: Math.max(values.length - 1, 0),
        sigmaMax: positive.length ? Math.max(...positive.map(p => p.sigma)) : null,
        sigmaMin: positive.length ? Math.min(...positive.map(p => p.sigma)) : null,
    };
}

function drawPlot(ctx, node, widgetWidth, y, lowQuality) {
    const data = plotData(node.strideSigmas);
    const x0 = PAD.left;
    const y0 = y + PAD.top;
    const w = Math.max(widgetWidth - PAD.left - PAD.right, 10);
    const h = Math.max(PLOT_HEIGHT - PAD.top - PAD.bottom, 10);
    const zeroY = y0 + h; // the bottom edge: where sigma = 0 goes
    const logBottom = y0 + h - 10; // sigma_min sits a little above it, so a final 0 stands apart
    const px = step => x0 + (data.steps > 0 ? (step / data.steps) * w : w / 2);
    const py = log => logBottom - ((log - data.logMin) / (data.logMax - data.logMin)) * (logBottom - y0 - 4);

    ctx.save();
    ctx.fillStyle = BOX_COLOUR;
    ctx.strokeStyle = GRID_COLOUR;
    ctx.lineWidth = 1;
    ctx.beginPath();
    ctx.rect(x0, y0, w, h);
    ctx.fill();
    ctx.stroke();

    ctx.font = "11px Arial, sans-serif";
    ctx.fillStyle = TEXT_COLOUR;
    if (!lowQuality) {
        ctx.textAlign = "left";
        ctx.textBaseline = "middle";
        const title = data.values.length
            ? `log σ · ${data.steps} step${data.steps === 1 ? "" : "s"}` +
              (data.zeros.length && data.zeros[data.zeros.length - 1].step === data.steps ? " · ends at 0" : "")
            : "empty schedule";
        ctx.fillText(title, x0, y + PAD.top / 2);
    }

    if (data.positive.length) {
        // Grid lines and labels at sigma_max and sigma_min.
        const top = py(Math.log(data.sigmaMax));
        const bottom = py(Math.log(data.sigmaMin));
        ctx.strokeStyle = GRID_COLOUR;
        ctx.setLineDash([3, 3]);
        ctx.beginPath();
        ctx.moveTo(x0, top);
        ctx.lineTo(x0 + w, top);
        ctx.moveTo(x0, bottom);
        ctx.lineTo(x0 + w, bottom);
        ctx.stroke();
        ctx.setLineDash([]);
        if (!lowQuality) {
            ctx.textAlign = "right";
            ctx.fillText(formatSigma(data.sigmaMax), x0 - 4, top);
            if (Math.abs(bottom - top) > 10) ctx.fillText(formatSigma(data.sigmaMin), x0 - 4, bottom);
        }

        // log sigma against the step: a line through the positive sigmas, a dot at each.
        ctx.strokeStyle = LINE_COLOUR;
        ctx.fillStyle = LINE_COLOUR;
        ctx.lineWidth = 2;
        ctx.beginPath();
        data.positive.forEach((p, i) => {
            const X = px(p.step);
            const Y = py(Math.log(p.sigma));
            if (i === 0) ctx.moveTo(X, Y);
            else ctx.lineTo(X, Y);
        });
        ctx.stroke();
        for (const p of data.positive) {
            ctx.beginPath();
            ctx.arc(px(p.step), py(Math.log(p.sigma)), 2.5, 0, Math.PI * 2);
            ctx.fill();
        }
    }

    // Sigmas of 0 have no log: a hollow dot on the bottom edge, joined to the last positive one.
    if (data.zeros.length) {
        ctx.strokeStyle = ZERO_COLOUR;
        ctx.lineWidth = 1.5;
        const last = data.positive[data.positive.length - 1];
        const final = data.zeros[data.zeros.length - 1];
        if (last && final.step > last.step) {
            ctx.setLineDash([3, 3]);
            ctx.beginPath();
            ctx.moveTo(px(last.step), py(Math.log(last.sigma)));
            ctx.lineTo(px(final.step), zeroY);
            ctx.stroke();
            ctx.setLineDash([]);
        }
        for (const z of data.zeros) {
            ctx.beginPath();
            ctx.arc(px(z.step), zeroY, 3, 0, Math.PI * 2);
            ctx.stroke();
        }
        if (!lowQuality) {
            ctx.fillStyle = ZERO_COLOUR;
            ctx.textAlign = "right";
            ctx.textBaseline = "middle";
            ctx.fillText("0", x0 - 4, zeroY);
        }
    }

    // Step axis: 0 on the left, the step count on the right.
    if (!lowQuality && data.values.length) {
        ctx.fillStyle = TEXT_COLOUR;
        ctx.textBaseline = "middle";
        ctx.textAlign = "left";
        ctx.fillText("0", x0, y0 + h + PAD.bottom / 2 + 1);
        ctx.textAlign = "center";
        ctx.fillText("step", x0 + w / 2, y0 + h + PAD.bottom / 2 + 1);
        ctx.textAlign = "right";
        ctx.fillText(String(data.steps), x0 + w, y0 + h + PAD.bottom / 2 + 1);
    }
    ctx.restore();
}

/** The plot widget: fixed height, drawn by litegraph in the widget column, never serialized. */
function plotWidget(node) {
    return {
        name: PLOT_WIDGET,
        type: PLOT_WIDGET,
        value: null,
        serialize: false, // not in the workflow's widgets_values
        options: { serialize: false }, // not in the prompt
        computeSize(width) {
            return [width ?? node.size[0], PLOT_HEIGHT];
        },
        draw(ctx, drawnNode, widgetWidth, y, _H, lowQuality) {
            drawPlot(ctx, drawnNode, widgetWidth, y, lowQuality);
            // Counted for tests/test_browser_sigmas.py, which also reads the drawn pixels.
            drawnNode.strideSigmaPlotDraws = (drawnNode.strideSigmaPlotDraws ?? 0) + 1;
        },
    };
}

/** Stores the sigmas on the node and makes sure it has the plot widget and room for it. */
export function showSigmas(node, sigmas) {
    node.strideSigmas = (Array.isArray(sigmas) ? sigmas : []).map(Number);
    if (!node.widgets?.some(w => w.name === PLOT_WIDGET)) {
        const hadWidgets = Boolean(node.widgets?.length);
        node.addCustomWidget(plotWidget(node));
        if (!hadWidgets) {
            // The plot is skipped in widgets_values, but a node with no widgets of its own would now save
            // an empty `widgets_values: []` it never had: leave it out, so the workflow stays as it was.
            const onSerialize = node.onSerialize;
            node.onSerialize = function (serialised) {
                onSerialize?.apply(this, arguments);
                if (Array.isArray(serialised.widgets_values) && serialised.widgets_values.length === 0) {
                    delete serialised.widgets_values;
                }
            };
        }
        // Grow by the plot's height, so the widgets above it (a multiline text box) keep their size.
        node.setSize([Math.max(node.size[0], PLOT_MIN_WIDTH), node.size[1] + PLOT_HEIGHT + 4]);
    }
    // The graph canvas redraws when dirty; with Vue nodes ("Nodes 2.0") the widget has a canvas of its own.
    node.widgets?.find(w => w.name === PLOT_WIDGET)?.triggerDraw?.();
    node.setDirtyCanvas?.(true, true);
    app.graph?.setDirtyCanvas(true, true);
}

app.registerExtension({
    name: "Stride.sigmaPlot",
    setup() {
        api.addEventListener("executed", ({ detail }) => {
            const sigmas = detail?.output?.[SIGMAS_KEY];
            if (!sigmas) return;
            const node = nodeByExecutionId(detail.display_node ?? detail.node);
            if (node) showSigmas(node, sigmas);
        });
    },
});
