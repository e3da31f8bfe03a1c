"""Structural accelerators as SAMPLER nodes: ParaDiGMS (model evaluations batched across steps) and Bottleneck
Sampling (the middle steps at a lower resolution)."""
import logging

from comfy_api.latest import io

from ..samplers import parallel
from ..samplers.core import VE
from .sampler_bridge import sampler_object

CATEGORY = "sampling/stride/samplers"


def _no_mask(extra_args, name):
    if (extra_args or {}).get("denoise_mask") is not None:
        raise ValueError(f"Stride {name}: inpainting masks (noise_mask) are not supported; sample without a mask")


def sample_paradigms_logged(model, x, sigmas, extra_args=None, callback=None, disable=None, param=VE, window=8,
                            tolerance=0.1):
    """ParaDiGMS with its trade reported: sequential rounds (wall time, given idle batch capacity) against
    total model evaluations."""
    _no_mask(extra_args, "ParaDiGMS")
    stats = {}
    out = parallel.sample_paradigms(model, x, sigmas, extra_args, callback, disable, param, window, tolerance, stats)
    if stats.get("steps"):
        logging.info("Stride ParaDiGMS: %d steps in %d sequential rounds (x%.2f fewer) with %d model evaluations per "
                     "image (x%.2f more); window %d, tolerance %g. Wall time falls only when the device has idle "
                     "batch capacity.", stats["steps"], stats["rounds"], stats["steps"] / stats["rounds"],
                     stats["evaluations"], stats["evaluations"] / stats["steps"], window, tolerance)
    return out


class StrideSamplerParaDiGMS(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StrideSamplerParaDiGMS", display_name="ParaDiGMS parallel sampler (Stride)", category=CATEGORY,
            description="ParaDiGMS (Shih et al. 2023): Picard iterations over a sliding window of DDIM steps, the "
                        "model evaluated on the whole window in one batch. Fewer sequential model calls, more model "
                        "evaluations in all: faster only when the GPU has idle batch capacity (small images, "
                        "batch 1). Each run logs its rounds and evaluations.",
            inputs=[io.Int.Input("window", default=8, min=1, max=64,
                                 tooltip="Steps evaluated together in one batch (1: plain sequential DDIM)."),
                    io.Float.Input("tolerance", default=0.1, min=1e-6, max=10.0, step=0.01,
                                   tooltip="How far a step may still move, relative to its sigma step, for the "
                                           "window to slide past it. Smaller: closer to sequential DDIM, more "
                                           "rounds.")],
            outputs=[io.Sampler.Output()])

    @classmethod
    def execute(cls, window, tolerance) -> io.NodeOutput:
        return io.NodeOutput(sampler_object(sample_paradigms_logged, "paradigms",
                                            {"window": window, "tolerance": tolerance}))


NODES = [StrideSamplerParaDiGMS]
