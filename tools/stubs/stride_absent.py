"""Import-time stand-ins for torchvision and torchaudio in Stride's test environments.

No build of either loads beside the CPU torch 2.13.0, yet ComfyUI imports them at module level in model
families and nodes that Stride's tests never run (cosmos, cascade, sam3, gemma4, audio VAEs, seedvr...).
Every stand-in module answers any name with a placeholder; any real use (a call) fails loudly.
"""


class Absent:
    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return Absent(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise ImportError(f"{self._name} is not available in Stride's test environment")

    def __mro_entries__(self, bases):  # `class X(torchvision.something)`: a plain base instead
        return (object,)


def module_getattr(module):
    """The __getattr__ of a stand-in module: placeholders for public names, AttributeError for dunders."""
    def getattr_(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return Absent(f"{module}.{name}")
    return getattr_
