"""Stride: training-free fast sampling for ComfyUI (V3 node API)."""
from comfy_api.latest import ComfyExtension

from .nodes import NODES

WEB_DIRECTORY = "./web"


class StrideExtension(ComfyExtension):
    async def get_node_list(self):
        return list(NODES)


async def comfy_entrypoint():
    return StrideExtension()
