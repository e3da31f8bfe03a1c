"""Lay out the example workflows left to right, with a Note on top, from the node sizes the real frontend draws.

Usage: .venv/bin/python tools/layout_examples.py   (rewrites example_workflows/*.json in place)

Each node goes in the column of its longest link path from a source node; columns are spaced by their widest node,
nodes in a column are stacked with room for their title bars. Sizes are measured in the frontend (a node is drawn
at least at its computed size). The Note text comes from NOTES below; the layout test in tests/test_browser.py
checks the result on every supported ComfyUI.
"""
import json
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]
from bench.workflow import EXAMPLES, load_example  # noqa: E402
from comfy_server import serve  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
LEFT, TOP, TITLE, GAP_X, GAP_Y = 40, 40, 30, 80, 50
NOTE_SIZE = [560, 150]
REAL_MODEL = ("For a real model: replace the demo loader with your checkpoint loader and text encoders, and use "
              "the latent size you render at.")
NOTES = {
    "stride_autotune": "Autotune: the best sampler x schedule, learned schedule or solver fitted to your model at "
                       "the model evaluations you pay (nfe), judged on held-out noises; its report lists every "
                       "candidate. " + REAL_MODEL + " Then widen its expert lists (samplers, schedulers, methods).",
    "stride_bottleneck_dit": "Bottleneck sampling: the first and last steps at full size, the middle ones at half "
                             "size, so the model does less work per step. " + REAL_MODEL,
    "stride_cache_plan_dit": "Cache plan (InvarDiff): the calibrate node measures which blocks change least on your "
                             "sampler and schedule, stores the plan and applies it; the plan text travels with the "
                             "workflow. " + REAL_MODEL + " Calibrate at your sampler, scheduler, steps and cfg.",
    "stride_calibrated_dpm_solver_v3": "DPM-Solver-v3: the calibrate node measures the model's statistics once "
                                       "(stored, and written as text), the sampler node uses them. " + REAL_MODEL,
    "stride_compare_samplers": "Compare samplers on my model: every sampler x scheduler x step count measured "
                               "against a reference solve of the model's own ODE, as a table and a plot. "
                               + REAL_MODEL,
    "stride_demo_dit": "The embedded Flux-style DiT (trained on digits) with a stride_* sampler in the plain "
                       "KSampler. " + REAL_MODEL,
    "stride_demo_oracle": "The exact oracle (its denoiser is analytic, EPS): every sampler can be checked against "
                          "the true answer. " + REAL_MODEL,
    "stride_demo_oracle_flow": "The exact oracle as a flow model (like SD3, Flux, WAN). " + REAL_MODEL,
    "stride_demo_unet": "The embedded SD1.5-style UNet (trained on digits) in the plain KSampler. " + REAL_MODEL,
    "stride_guidance_interval": "CFG schedule: guidance only inside an interval of the noise range; outside it the "
                                "unconditional pass is not computed (the run's log says how many were skipped). "
                                + REAL_MODEL,
    "stride_samplers_custom": "Stride samplers as SAMPLER nodes in SamplerCustomAdvanced, with their options. "
                              + REAL_MODEL,
    "stride_samplers_ksampler": "Stride samplers by name (stride_*) in the plain KSampler: no other node needed. "
                                + REAL_MODEL,
    "stride_schedule_gits": "GITS: the optimal steps for your model, sampler and cfg found by dynamic programming "
                            "(stored; the schedule also travels as text). " + REAL_MODEL,
    "stride_tstitch_dit": "T-Stitch: a small model of the same family takes the first 40% of the noise range, the "
                          "large one the rest. For real models: two checkpoints of one family sharing the text "
                          "encoder.",
}


def measure(page, workflow):
    """({node id: [w, h]} as the frontend draws each node, {node id: widgets_values} as it saves them, which fills
    in the defaults of widgets added to a node since the workflow was written) once the workflow is loaded."""
    return page.evaluate("""async workflow => {
        await app.loadGraphData(workflow, true, true, "layout");
        const sizes = {}, values = {};
        for (const n of app.graph.nodes) {
            const min = n.computeSize ? n.computeSize() : n.size;
            sizes[n.id] = [Math.max(n.size[0], min[0]), Math.max(n.size[1], min[1])];
        }
        for (const n of app.graph.serialize().nodes) values[n.id] = n.widgets_values;
        return [sizes, values];
    }""", workflow)


def columns(workflow):
    """{node id: column}: the longest link path from a source node."""
    column = {n["id"]: 0 for n in workflow["nodes"]}
    edges = [(link[1], link[3]) for link in workflow["links"]]
    for _ in range(len(column)):
        for a, b in edges:
            column[b] = max(column[b], column[a] + 1)
    return column


def layout(workflow, measured, note):
    sizes, values = measured
    nodes = [n for n in workflow["nodes"] if n["type"] != "Note"]
    for n in nodes:
        if values.get(str(n["id"])) is not None:
            n["widgets_values"] = values[str(n["id"])]
    column = columns({**workflow, "nodes": nodes})
    widths = {}
    for n in nodes:
        widths[column[n["id"]]] = max(widths.get(column[n["id"]], 0), sizes[str(n["id"])][0])
    x, left = LEFT, {}
    for c in sorted(widths):
        left[c] = x
        x += widths[c] + GAP_X
    top = TOP + TITLE + NOTE_SIZE[1] + GAP_Y + TITLE
    y = {c: top for c in widths}
    for n in sorted(nodes, key=lambda n: (column[n["id"]], n["id"])):
        c, size = column[n["id"]], sizes[str(n["id"])]
        n["pos"], n["size"] = [left[c], y[c]], [round(size[0], 2), round(size[1], 2)]
        y[c] += size[1] + TITLE + GAP_Y
    note_id = max(n["id"] for n in nodes) + 1
    workflow["nodes"] = nodes + [{"id": note_id, "type": "Note", "pos": [LEFT, TOP + TITLE], "size": NOTE_SIZE,
                                  "flags": {}, "order": len(nodes), "mode": 0, "inputs": [], "outputs": [],
                                  "properties": {}, "widgets_values": [note]}]
    workflow["last_node_id"] = max(workflow.get("last_node_id", 0), note_id)
    return workflow


def main():
    from playwright.sync_api import sync_playwright
    names = sorted(f[:-len(".json")] for f in os.listdir(EXAMPLES))
    missing = set(names) - set(NOTES)
    if missing:
        sys.exit(f"no Note text for {sorted(missing)}")
    with tempfile.TemporaryDirectory() as base, serve(base) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu",
                                                                    "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(url)
        page.wait_for_function("window.app && window.app.graph", timeout=30_000)
        for name in names:
            workflow = load_example(name)
            workflow["nodes"] = [n for n in workflow["nodes"] if n["type"] != "Note"]
            laid = layout(workflow, measure(page, workflow), NOTES[name])
            with open(os.path.join(EXAMPLES, f"{name}.json"), "w", encoding="utf-8") as f:
                json.dump(laid, f, indent=2)
                f.write("\n")
            print(f"{name}: {len(laid['nodes'])} nodes laid out")
        browser.close()


if __name__ == "__main__":
    main()
