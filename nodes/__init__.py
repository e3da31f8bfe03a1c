"""ComfyUI adapters: thin nodes that read ComfyUI objects and call Stride's math."""
from . import compare, demo, samplers

NODES = [*demo.NODES, *samplers.NODES, *compare.NODES]
