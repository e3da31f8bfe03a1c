"""Stride: training-free fast sampling for ComfyUI (V3 node API)."""
from comfy_api.latest import ComfyExtension

from .nodes import NODES
from .nodes.bespoke import KSAMPLERS as BESPOKE_KSAMPLERS
from .nodes.calibrated import KSAMPLERS as CALIBRATED_KSAMPLERS
from .nodes.calibration_store import register as register_calibration_folder
from .nodes.sampler_bridge import register_ksampler_names

WEB_DIRECTORY = "./web"
# the stride_* names in KSampler / KSamplerSelect (idempotent)
register_ksampler_names({**CALIBRATED_KSAMPLERS, **BESPOKE_KSAMPLERS})
register_calibration_folder()  # models/stride_calibrations


class StrideExtension(ComfyExtension):
    async def get_node_list(self):
        return list(NODES)


async def comfy_entrypoint():
    return StrideExtension()
