"""The sigma plot of web/stride.js in the real ComfyUI frontend, driven by headless Chromium.

A graph StrideScheduleFromText -> StrideSigmaPreview is built in the page and run from the UI's Run
button; both nodes receive `stride_sigmas` in the "executed" event, keep them as node.strideSigmas and
draw log sigma against the step. The test reads the canvas pixels inside the plot box, so it fails when
drawing breaks, and checks that nodes without sigmas draw nothing and that no page error occurs.
"""
import math
import os

from test_browser import ARGS, CHROMIUM, history, wait_for_new_run

SCHEDULE = "14.6146, 6.4746, 3.8637, 1.3944, 0.3977, 0.0292, 0"
EXPECTED = [float(s) for s in SCHEDULE.split(",")]
PLOT_WIDGET = "stride_sigma_plot"  # web/stride.js
PLOT_HEIGHT = 150
LINE_RGB = (0x4f, 0xc3, 0xf7)  # web/stride.js LINE_COLOUR
ZERO_RGB = (0xff, 0xb7, 0x4d)  # web/stride.js ZERO_COLOUR

BUILD_GRAPH = """schedule => {
    const graph = app.graph;
    graph.clear();
    const add = (type, pos) => { const node = LiteGraph.createNode(type); node.pos = pos; graph.add(node); return node; };
    const text = add('StrideScheduleFromText', [40, 60]);
    text.widgets.find(w => w.name === 'schedule').value = schedule;
    const preview = add('StrideSigmaPreview', [460, 60]);
    text.connect(0, preview, 0);
    const idle = add('StrideScheduleFromText', [40, 520]);   // never runs: no sigmas, no plot
    const other = add('BasicScheduler', [460, 520]);         // not Stride's, not run
    app.canvas.ds.scale = 1;
    app.canvas.ds.offset = [100, 60];  // clear of the side bar and the tabs, for the screenshot
    app.canvas.setDirty(true, true);
    return {text: text.id, preview: preview.id, idle: idle.id, other: other.id};
}"""

# Draws the canvas now and counts, for each node, the pixels of the plot's line and zero-mark colours
# inside the node's rectangle (read from the canvas itself, so no overlay of the UI gets in the way).
PIXELS = """([ids, line, zero]) => {
    const canvas = app.canvas.canvas;
    app.canvas.setDirty(true, true);
    app.canvas.draw(true, true);
    const ratio = canvas.width / canvas.clientWidth;
    const ctx = canvas.getContext('2d');
    const near = (data, i, rgb) => Math.abs(data[i] - rgb[0]) < 24 && Math.abs(data[i + 1] - rgb[1]) < 24
        && Math.abs(data[i + 2] - rgb[2]) < 24;
    const result = {};
    for (const [key, id] of Object.entries(ids)) {
        const node = app.graph.getNodeById(id);
        const [x, y] = app.canvas.ds.convertOffsetToCanvas([node.pos[0], node.pos[1]]);
        const scale = app.canvas.ds.scale * ratio;
        const rect = [Math.round(x * ratio), Math.round(y * ratio),
                      Math.round(node.size[0] * scale), Math.round(node.size[1] * scale)];
        const data = ctx.getImageData(...rect).data;
        let lineCount = 0, zeroCount = 0;
        for (let i = 0; i < data.length; i += 4) {
            if (near(data, i, line)) lineCount++;
            if (near(data, i, zero)) zeroCount++;
        }
        result[key] = {line: lineCount, zero: zeroCount, draws: node.strideSigmaPlotDraws ?? 0,
                       size: [...node.size], sigmas: node.strideSigmas ?? null,
                       widgets: (node.widgets ?? []).map(w => w.name)};
    }
    return result;
}"""


def close(values, expected):
    return len(values) == len(expected) and all(math.isclose(v, e, rel_tol=1e-6, abs_tol=1e-9)
                                                for v, e in zip(values, expected))


def test_sigma_plot_is_drawn_after_a_run_from_the_ui(comfy_server, tmp_path):
    assert os.path.exists(CHROMIUM), f"{CHROMIUM} is missing: install Debian's chromium with `make browser`"
    from playwright.sync_api import sync_playwright

    page_errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.on("pageerror", lambda error: page_errors.append(str(error)))
            page.goto(comfy_server)
            page.wait_for_function("window.app && window.app.graph", timeout=20_000)
            assert "Stride.sigmaPlot" in page.evaluate("() => app.extensions.map(e => e.name)")

            ids = page.evaluate(BUILD_GRAPH, SCHEDULE)
            workflow_before = page.evaluate("() => app.graph.serialize().nodes.map(n => n.widgets_values)")
            prompt_before = page.evaluate("async () => (await app.graphToPrompt()).output")
            before = page.evaluate(PIXELS, [ids, LINE_RGB, ZERO_RGB])
            for key in ids:  # nothing has run: no node has sigmas, a plot widget, or the plot's colours
                assert before[key]["sigmas"] is None and PLOT_WIDGET not in before[key]["widgets"], key
                assert before[key]["draws"] == 0 and before[key]["line"] == 0 and before[key]["zero"] == 0, key

            seen = set(history(comfy_server))
            page.get_by_role("button", name="Run", exact=True).first.click()
            entry = wait_for_new_run(comfy_server, seen, timeout=60)
            assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
            for key in ("text", "preview"):
                assert close(entry["outputs"][str(ids[key])]["stride_sigmas"], EXPECTED)
            page.wait_for_function("ids => ids.every(id => app.graph.getNodeById(id).strideSigmas)",
                                   arg=[ids["text"], ids["preview"]], timeout=10_000)
            # The event marks the canvas dirty, and the UI's own render loop draws the plots.
            page.wait_for_function("ids => ids.every(id => app.graph.getNodeById(id).strideSigmaPlotDraws > 0)",
                                   arg=[ids["text"], ids["preview"]], timeout=10_000)

            after = page.evaluate(PIXELS, [ids, LINE_RGB, ZERO_RGB])
            page.screenshot(path=str(tmp_path / "sigma_plot.png"))
            for key in ("text", "preview"):
                node, old = after[key], before[key]
                assert close(node["sigmas"], EXPECTED), (key, node["sigmas"])
                assert node["widgets"].count(PLOT_WIDGET) == 1, key
                assert node["size"][1] >= old["size"][1] + PLOT_HEIGHT, (key, old["size"], node["size"])
                assert node["draws"] > 0, key
                # The line through 6 points over ~180 px of steps, 2 px wide: hundreds of pixels; the
                # hollow mark of the final 0 and its dashed link: a few dozen.
                assert node["line"] > 200, (key, node["line"])
                assert node["zero"] > 15, (key, node["zero"])
            for key in ("idle", "other"):
                assert after[key] == before[key], key

            # The plot is never saved: neither in the workflow nor in the prompt.
            assert page.evaluate("() => app.graph.serialize().nodes.map(n => n.widgets_values)") == workflow_before
            assert page.evaluate("async () => (await app.graphToPrompt()).output") == prompt_before

            # Edge cases through the same event: an empty list, one value, only zeros, and ids that name no node.
            api = "(await import('/scripts/api.js')).api"
            for sigmas in ([], [3.5], [0.0], [5.0, 5.0, 0.0]):
                page.evaluate(f"""async ([id, sigmas]) => {{
                    {api}.dispatchCustomEvent('executed', {{node: String(id), output: {{stride_sigmas: sigmas}}}});
                }}""", [ids["idle"], sigmas])
                idle = page.evaluate(PIXELS, [ids, LINE_RGB, ZERO_RGB])["idle"]
                assert idle["sigmas"] == sigmas and idle["widgets"].count(PLOT_WIDGET) == 1, (sigmas, idle)
                assert idle["draws"] > 0, sigmas
                if sigmas and sigmas[0] > 0:
                    assert idle["line"] > 0, sigmas
            sizes = page.evaluate("ids => ids.map(id => [...app.graph.getNodeById(id).size])", list(ids.values()))
            for node_id in ("9999", "9999:1", f"{ids['text']}:1"):
                page.evaluate(f"""async id => {{
                    {api}.dispatchCustomEvent('executed', {{node: id, output: {{stride_sigmas: [1.0, 0.0]}}}});
                }}""", node_id)
            assert page.evaluate("ids => ids.map(id => [...app.graph.getNodeById(id).size])",
                                 list(ids.values())) == sizes
            assert page.evaluate(f"() => app.graph.getNodeById({ids['other']}).strideSigmas") is None
        finally:
            browser.close()
    assert not page_errors, page_errors
    print(f"screenshot: {tmp_path / 'sigma_plot.png'}")
