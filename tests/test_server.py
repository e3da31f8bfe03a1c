"""Stride inside the real ComfyUI server: node definitions, example workflows, prompts over HTTP."""
import io
import os
import urllib.parse

import numpy as np
import pytest
from PIL import Image

from bench import host
from bench.workflow import EXAMPLES, load_example, ui_to_api
from comfy_server import get, post_json, wait_for_history

NAMES = sorted(os.path.splitext(f)[0] for f in os.listdir(EXAMPLES) if f.endswith(".json"))

def save_node(workflow):
    """The id (API prompt key) of a workflow's SaveImage node, or None."""
    return next((str(n["id"]) for n in workflow["nodes"] if n["type"] == "SaveImage"), None)


DEMOS = [name for name in NAMES if save_node(load_example(name))]  # the examples that save ten digits


def pixels(png_bytes):
    return np.asarray(Image.open(io.BytesIO(png_bytes)).convert("RGB"), dtype=np.int16)


def test_object_info_lists_stride_nodes_with_tooltips(comfy_server):
    info = get(f"{comfy_server}/object_info")
    ours = {name: node for name, node in info.items() if node["python_module"] == "custom_nodes.stride"}
    assert {"StrideDemoModel", "StrideDigitsDecode"} <= set(ours)
    for name, node in ours.items():
        assert name.startswith("Stride") and node["description"], name
        for group in ("required", "optional"):
            for input_name, (_, *options) in node["input"].get(group, {}).items():
                assert options and options[0].get("tooltip"), f"{name}.{input_name} has no tooltip"


def test_workflow_templates_lists_the_examples(comfy_server):
    assert set(DEMOS) <= set(NAMES)
    assert sorted(get(f"{comfy_server}/api/workflow_templates")["stride"]) == NAMES
    for name in NAMES:
        served = get(f"{comfy_server}/api/workflow_templates/stride/{name}.json")
        assert served == load_example(name)


def saved_pixels(image):
    """The pixels of an image that SaveImage wrote in this process."""
    with open(os.path.join(host._state["base"], "output", image["subfolder"], image["filename"]), "rb") as f:
        return pixels(f.read())


@pytest.mark.parametrize("name", DEMOS)
def test_example_runs_in_process(run_prompt, name):
    workflow = load_example(name)
    images = run_prompt(ui_to_api(workflow))[0][save_node(workflow)]["images"]
    assert len(images) == 10
    assert all(saved_pixels(image).std() > 10 for image in images)  # digits, not blank images


@pytest.mark.parametrize("name", DEMOS)
def test_example_runs_on_the_server_as_in_process(comfy_server, run_prompt, name):
    workflow = load_example(name)
    prompt, save = ui_to_api(workflow), save_node(workflow)
    prompt_id = post_json(f"{comfy_server}/prompt", {"prompt": prompt, "client_id": "pytest"})["prompt_id"]
    images = wait_for_history(comfy_server, prompt_id)["outputs"][save]["images"]
    assert len(images) == 10
    served = pixels(get(f"{comfy_server}/view?" + urllib.parse.urlencode(images[7])))
    assert served.shape == (128, 128, 3)  # a 16x16 digit at scale 8
    # The server draws the same digits as ComfyUI in this process.
    local = run_prompt(prompt)[0][save]["images"]
    assert np.abs(saved_pixels(local[7]) - served).max() <= 1


def test_ui_to_api_errors_are_clear():
    workflow = load_example("stride_demo_oracle")
    workflow["nodes"][0] = dict(workflow["nodes"][0], type="NotAStrideNode")
    with pytest.raises(ValueError, match="unknown node type 'NotAStrideNode'"):
        ui_to_api(workflow)
    workflow = load_example("stride_demo_oracle")
    workflow["nodes"][1] = dict(workflow["nodes"][1], widgets_values=[0, 10])
    with pytest.raises(ValueError, match="2 widget values"):
        ui_to_api(workflow)
