"""Stride in the real ComfyUI frontend, driven by headless Chromium through Playwright.

Needs Debian's chromium at /usr/bin/chromium (`make browser`; CI installs it). Without it the
test fails: it is never skipped.
"""
import json
import os
import time
import urllib.request

from bench import host
from bench.workflow import load_example, ui_to_api

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
STRIDE_COLOUR = "#1d5c63"  # web/stride.js
EXAMPLES = sorted(f[:-len(".json")] for f in os.listdir(os.path.join(host.REPO, "example_workflows")))


def history(url):
    with urllib.request.urlopen(f"{url}/history", timeout=30) as response:
        return json.load(response)


def wait_for_new_run(url, seen, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for prompt_id, entry in history(url).items():
            if prompt_id not in seen and entry["status"].get("completed") is not None:
                return entry
        time.sleep(0.2)
    raise TimeoutError(f"no prompt from the UI finished in {timeout} s")


# Pairs of nodes whose boxes (title bar included, as drawn) overlap, and links that lead nowhere.
LAYOUT_PROBLEMS = """() => {
    const title = LiteGraph.NODE_TITLE_HEIGHT, problems = [], nodes = app.graph.nodes;
    const box = n => [n.pos[0], n.pos[1] - title, n.pos[0] + n.size[0], n.pos[1] + n.size[1]];
    for (let i = 0; i < nodes.length; i++)
        for (let j = i + 1; j < nodes.length; j++) {
            const [a, b] = [box(nodes[i]), box(nodes[j])];
            if (a[0] < b[2] && b[0] < a[2] && a[1] < b[3] && b[1] < a[3])
                problems.push(`${nodes[i].type} #${nodes[i].id} overlaps ${nodes[j].type} #${nodes[j].id}`);
        }
    const links = app.graph.links instanceof Map ? [...app.graph.links.values()] : Object.values(app.graph.links);
    for (const l of links)
        if (l && (!app.graph.getNodeById(l.origin_id) || !app.graph.getNodeById(l.target_id)))
            problems.push(`link ${l.id} leads nowhere`);
    for (const n of nodes)
        for (const input of n.inputs || [])
            if (!input.widget && input.link == null && !(n.constructor.nodeData?.input?.optional || {})[input.name])
                problems.push(`${n.type} #${n.id}: input ${input.name} is not connected`);
    return problems;
}"""


def is_strides(message):
    return "/extensions/stride/" in message.location.get("url", "") or "stride" in message.text.lower()


def test_ui_loads_stride_and_runs_the_example(comfy_server, tmp_path):
    assert os.path.exists(CHROMIUM), (f"{CHROMIUM} is missing: install Debian's chromium with `make browser` "
                                      "(CI installs it); the browser test is never skipped")
    from playwright.sync_api import sync_playwright

    page_errors, stride_errors = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.on("pageerror", lambda error: page_errors.append(str(error)))
            page.on("console", lambda m: m.type == "error" and is_strides(m) and stride_errors.append(m.text))
            page.goto(comfy_server)
            page.wait_for_function("window.app && window.app.graph", timeout=20_000)

            # The frontend knows Stride's nodes, and Stride's extension is loaded and colours them.
            types = page.evaluate("() => Object.keys(LiteGraph.registered_node_types)")
            assert {"StrideDemoModel", "StrideDigitsDecode"} <= set(types)
            assert "Stride.core" in page.evaluate("() => app.extensions.map(e => e.name)")
            assert page.evaluate("() => LiteGraph.createNode('StrideDigitsDecode').color") == STRIDE_COLOUR
            assert page.evaluate("() => LiteGraph.createNode('KSampler').color") is None

            # Each example, served as a template, loads, converts to the prompt ui_to_api computes, and runs
            # from the UI's Run button.
            for name in EXAMPLES:
                workflow = page.evaluate("""async name => {
                    const response = await fetch(`/api/workflow_templates/stride/${name}.json`);
                    const workflow = await response.json();
                    await app.loadGraphData(workflow, true, true, name);
                    return workflow;
                }""", name)
                assert workflow == load_example(name)
                assert page.evaluate("() => app.graph.nodes.length") == len(workflow["nodes"])
                assert page.evaluate(LAYOUT_PROBLEMS) == [], name
                assert page.evaluate("async () => (await app.graphToPrompt()).output") == ui_to_api(workflow)
                seen = set(history(comfy_server))
                page.get_by_role("button", name="Run", exact=True).first.click()
                entry = wait_for_new_run(comfy_server, seen)
                assert entry["status"]["status_str"] == "success", (name, entry["status"]["messages"])
                images = [n for n in workflow["nodes"] if n["type"] in ("SaveImage", "PreviewImage")]
                for node in images:  # a digit grid of 10 per image node, or the compare node's one plot
                    expected = 10 if node["type"] == "SaveImage" else 1
                    assert len(entry["outputs"][str(node["id"])]["images"]) == expected, name
            page.locator("canvas#graph-canvas").click(position={"x": 600, "y": 600})
            page.keyboard.press(".")  # fit the graph in view
            page.wait_for_timeout(300)  # let the UI draw the result
            page.screenshot(path=str(tmp_path / "stride_ui.png"))
        finally:
            browser.close()
    assert not page_errors, page_errors
    assert not stride_errors, stride_errors
    print(f"screenshot: {tmp_path / 'stride_ui.png'}")
