"""The harness itself: ComfyUI's modules win over Stride's, and the pack loads through ComfyUI's loader."""
import os
import sys

from bench import host


def test_comfyui_nodes_module_is_not_strides():
    # Stride has a nodes/ package; ComfyUI's top-level `nodes` must still be ComfyUI's nodes.py.
    assert os.path.samefile(sys.modules["nodes"].__file__, os.path.join(host.COMFY_ROOT, "nodes.py"))
    assert hasattr(sys.modules["nodes"], "NODE_CLASS_MAPPINGS")


def test_pack_loaded_by_comfyui_loader(node_class):
    import nodes
    for node_id in ("StrideDemoModel", "StrideDigitsDecode"):
        assert node_id in nodes.NODE_CLASS_MAPPINGS
        # V3 nodes loaded by ComfyUI's loader carry the custom_nodes module path.
        assert node_class(node_id).RELATIVE_PYTHON_MODULE.startswith("custom_nodes.")
    assert nodes.LOADED_MODULE_DIRS  # the loader recorded the pack's web directory
    assert any(os.path.samefile(p, os.path.join(host.REPO, "web")) for p in nodes.EXTENSION_WEB_DIRS.values())
