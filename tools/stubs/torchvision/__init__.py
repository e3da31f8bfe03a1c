"""Import-time stand-in for torchvision (see stride_absent.py)."""
from stride_absent import module_getattr

__getattr__ = module_getattr(__name__)
