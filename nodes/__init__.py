"""ComfyUI adapters: thin nodes that read ComfyUI objects and call Stride's math."""
from . import demo, samplers

NODES = [*demo.NODES, *samplers.NODES]
