"""Import-time stand-in for torchvision.transforms; any real use fails loudly."""


def __getattr__(name):
    raise ImportError(f"torchvision.transforms.{name} is not available in Stride's test environment")
