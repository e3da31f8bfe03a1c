"""Stride's test harness: the real ComfyUI 0.3.75 on CPU, with Stride loaded by ComfyUI's own loader.

ComfyUI is booted once, at collection time, before pytest imports anything of the pack (the root
__init__.py imports comfy_api). Tests take node classes from ComfyUI's registry and Stride modules
through `stride(...)`, never by importing the pack themselves.
"""
import asyncio
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import host  # noqa: E402

torch.set_num_threads(1)  # small tensors; and the test server shares the 2 cores
host.boot()
TEST_NODES = os.path.join(os.path.dirname(__file__), "test_nodes", "capture.py")
import nodes as comfy_nodes  # noqa: E402  (ComfyUI's nodes.py: host.boot put its root first)

asyncio.run(comfy_nodes.load_custom_node(TEST_NODES, module_parent="test_nodes"))
from tiny_models import tiny_unet, tiny_dit  # noqa: E402,F401
from comfy_server import comfy_server  # noqa: E402,F401


@pytest.fixture(scope="session")
def stride():
    """stride('demo.oracle') -> the Stride submodule as ComfyUI loaded it."""
    return host.stride


@pytest.fixture(scope="session")
def node_class():
    """node_class('StrideDemoModel') -> the class registered in ComfyUI."""
    return lambda name: comfy_nodes.NODE_CLASS_MAPPINGS[name]


@pytest.fixture(scope="session")
def oracle_model(stride):
    """oracle_model('eps' | 'flow', shift=1.0) -> a ComfyUI ModelPatcher around the exact oracle."""
    return stride("nodes.oracle_model").build_oracle_model


@pytest.fixture(scope="session")
def guided_oracle(stride):
    """guided_oracle(flow, labels, cfg) -> D(x, sigma): the exact oracle's guided denoiser in float64, VE or flow;
    row r is conditioned on labels[r % len(labels)] (solvers and optimizers stack copies of a batch)."""
    mixture = stride("nodes.oracle_model").load_mixture()

    def make(flow, labels, cfg=3.0):
        labels = torch.as_tensor(labels)

        def denoise(x, sigma, **_):
            sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(x.shape[0])
            alpha = 1 - sigma if flow else torch.ones_like(sigma)
            return mixture.guided_denoise(x, sigma, alpha, labels.repeat(x.shape[0] // len(labels)), cfg)
        return denoise
    return make


@pytest.fixture
def calibration_store(stride, tmp_path):
    """A fresh calibration folder, first in the list (where calibrations are saved); removed after the test."""
    import folder_paths
    st = stride("nodes.calibration_store")
    st.register()
    paths = folder_paths.folder_names_and_paths[st.FOLDER][0]
    paths.insert(0, str(tmp_path))
    yield tmp_path
    paths.remove(str(tmp_path))


@pytest.fixture
def run_prompt():
    """run_prompt(api_prompt) -> (history outputs, {key: tensor} from StrideTestCapture nodes)."""
    captured = comfy_nodes.NODE_CLASS_MAPPINGS["StrideTestCapture"].captured

    def run(prompt):
        captured.clear()
        outputs = host.run_prompt(prompt)
        return outputs, dict(captured)
    return run


def pytest_report_header(config):
    """The ComfyUI tree this run tests against (make test runs the suite on each supported version)."""
    import comfyui_version
    return f"ComfyUI {comfyui_version.__version__} at {host.COMFY_ROOT}"
