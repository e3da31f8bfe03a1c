"""Import-time stand-in for torchvision.transforms (see stride_absent.py)."""
from stride_absent import module_getattr

__getattr__ = module_getattr(__name__)
