"""Import-time stand-in for torchvision (PyPI's build does not load beside the CPU torch 2.13.0).

ComfyUI imports torchvision.transforms at import time in a few model families that Stride's tests
never run; any real use fails loudly.
"""


def __getattr__(name):
    raise ImportError(f"torchvision.{name} is not available in Stride's test environment")
