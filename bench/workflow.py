"""Convert a UI-format workflow (what the ComfyUI frontend saves) to the API prompt format.

The frontend stores a node's widget values as a flat list, in the order of the node's inputs
(required, then optional) that have a widget; links live in the workflow's `links` table. This
module rebuilds the API prompt from ComfyUI's own node definitions, as `app.graphToPrompt()` does
in the browser, so the example workflows can run headless (it boots ComfyUI in-process if needed).

Covered: plain nodes, links, widget inputs fed by a link, control-after-generate widgets and
Note nodes. Not covered (a clear error instead): muted or bypassed nodes, frontend-only helper
nodes (Reroute, PrimitiveNode), group nodes and subgraphs.
"""
import json
import os

from . import host

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "example_workflows")
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote"}  # drawn by the frontend, never sent to the server


def load_example(name):
    """The UI-format workflow example_workflows/<name>.json."""
    with open(os.path.join(EXAMPLES, f"{name}.json"), encoding="utf-8") as f:
        return json.load(f)


def _widget_slots(name, input_type, options):
    """How many widgets_values entries an input owns: 0 (a socket only), 1, or more (extra widgets)."""
    is_combo = isinstance(input_type, list) or input_type == "COMBO"
    if not (is_combo or input_type in WIDGET_TYPES) or options.get("forceInput"):
        return 0
    # The frontend's rule: an INT gets a "control after generate" widget when its options ask for
    # one, or by default when it is named seed / noise_seed; a COMBO only when asked.
    control = options.get("control_after_generate")
    if control is None and input_type == "INT":
        control = name in ("seed", "noise_seed")
    upload = options.get("image_upload")  # LoadImage's upload button saves a value too
    return 1 + bool(control) + bool(upload)


def ui_to_api(workflow):
    """The API prompt {node_id: {"class_type", "inputs", "_meta"}} of a UI-format workflow dict."""
    host.boot()  # once per process; puts ComfyUI first on sys.path
    import nodes  # ComfyUI's nodes.py

    links = {}  # link id -> (origin node id, origin slot); lists in format 0.4, dicts in format 1
    for link in workflow.get("links", []):
        if isinstance(link, dict):
            links[link["id"]] = (link["origin_id"], link["origin_slot"])
        else:
            links[link[0]] = (link[1], link[2])
    if (workflow.get("definitions") or {}).get("subgraphs"):
        raise ValueError("workflows with subgraphs are not supported")
    prompt = {}
    for node in workflow["nodes"]:
        kind, node_id = node["type"], node["id"]
        if kind in FRONTEND_ONLY:
            continue
        if kind not in nodes.NODE_CLASS_MAPPINGS:
            raise ValueError(f"node {node_id}: unknown node type {kind!r} (is the pack that "
                             "provides it installed? Reroute/PrimitiveNode are not supported here)")
        if node.get("mode", 0) != 0:
            raise ValueError(f"node {node_id} ({kind}): muted or bypassed nodes are not supported")
        spec = nodes.NODE_CLASS_MAPPINGS[kind].INPUT_TYPES()
        linked = {i["name"]: i["link"] for i in node.get("inputs", []) if i.get("link") is not None}
        values = node.get("widgets_values") or []
        if isinstance(values, dict):
            raise ValueError(f"node {node_id} ({kind}): widgets_values by name are not supported")
        inputs, used = {}, 0
        for group in ("required", "optional"):
            for name, (input_type, *rest) in spec.get(group, {}).items():
                slots = _widget_slots(name, input_type, rest[0] if rest else {})
                if slots and used < len(values):
                    inputs[name] = values[used]
                used += slots
                if name in linked:
                    origin, origin_slot = links[linked[name]]
                    inputs[name] = [str(origin), origin_slot]
        if used != len(values):
            raise ValueError(f"node {node_id} ({kind}): {len(values)} widget values, but its "
                             f"definition has {used} widget slots")
        title = node.get("title") or nodes.NODE_DISPLAY_NAME_MAPPINGS.get(kind, kind)
        prompt[str(node_id)] = {"inputs": inputs, "class_type": kind, "_meta": {"title": title}}
    return prompt
