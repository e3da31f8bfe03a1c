"""Boot the real ComfyUI in-process (CPU) and load Stride through ComfyUI's own custom-node loader.

Used by the benchmarks, the demo and the tests. The order of the steps matters (see boot()).
"""
import asyncio
import importlib
import os
import sys
import tempfile
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMFY_ROOT = os.path.abspath(os.environ.get("STRIDE_COMFYUI", os.path.join(REPO, ".comfyui", "ComfyUI")))
STUBS = os.path.join(REPO, "tools", "stubs")
_state = {}


def boot(base_dir=None, cpu=True):
    """Import ComfyUI (on the CPU unless cpu=False: then on ComfyUI's own choice of device), load its built-in nodes
    and the Stride pack; returns the pack module."""
    if "pack" in _state:
        return _state["pack"]
    if not os.path.exists(os.path.join(COMFY_ROOT, "main.py")):
        raise RuntimeError(f"ComfyUI not found at {COMFY_ROOT}: run `make setup` first")
    # 1. ComfyUI's root first (its nodes.py must win over Stride's nodes/ package), then the stubs.
    for path in (STUBS, COMFY_ROOT):
        if path in sys.path:
            sys.path.remove(path)
        sys.path.insert(0, path)
    # 2. CPU before comfy.model_management is imported.
    import comfy.cli_args
    comfy.cli_args.args.cpu = cpu
    # 3. ComfyUI's utils package before nodes.py puts comfy/ on sys.path.
    import utils.extra_config  # noqa: F401
    import utils.install_util  # noqa: F401
    import utils.json_util  # noqa: F401
    # 4. Private input/output/temp/user folders.
    import folder_paths
    base = base_dir or tempfile.mkdtemp(prefix="stride-comfy-")
    for name in ("input", "output", "temp", "user"):
        os.makedirs(os.path.join(base, name), exist_ok=True)
        getattr(folder_paths, f"set_{name}_directory")(os.path.join(base, name))
    _state["base"] = base
    import nodes
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    if not asyncio.run(nodes.load_custom_node(REPO)):
        raise RuntimeError("ComfyUI's loader failed to load the Stride pack (see the log above)")
    _state["pack"] = sys.modules[_pack_module_name()]
    return _state["pack"]


def _pack_module_name():
    # ComfyUI's loader registers a folder pack under its absolute path, with '.' replaced by '_x_'.
    return REPO.replace(".", "_x_")


def stride(module):
    """A Stride submodule as loaded by ComfyUI, e.g. stride('samplers.reference')."""
    boot()
    return importlib.import_module(f"{_pack_module_name()}.{module}")


def node(name):
    """A node class as ComfyUI registered it, e.g. node('StrideStepCache')."""
    boot()
    import nodes
    return nodes.NODE_CLASS_MAPPINGS[name]


class _Server:
    """The few PromptServer members that PromptExecutor uses."""
    client_id = None
    last_node_id = None
    last_prompt_id = None
    sockets_metadata = {}

    def send_sync(self, *args, **kwargs):
        pass

    def queue_updated(self):
        pass


def run_prompt(prompt):
    """Validate and execute an API-format prompt with ComfyUI's PromptExecutor; returns the UI outputs."""
    boot()
    import execution
    prompt_id = str(uuid.uuid4())
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid:
        raise ValueError(f"prompt failed validation: {error} {node_errors}")
    executor = execution.PromptExecutor(_Server(), cache_type=execution.CacheType.CLASSIC,
                                        cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
    executor.execute(prompt, prompt_id, {"client_id": None}, outputs)
    if not executor.success:
        messages = [m for m in executor.status_messages if m[0] == "execution_error"]
        raise RuntimeError(f"prompt failed: {messages}")
    return executor.history_result["outputs"]
