"""Stitching accelerator: T-Stitch (Pan et al. 2024, arXiv:2402.14167): the first part of the noise range
denoised by a small model of the same family, the rest by the large one. Hooked through ComfyUI's public
APPLY_MODEL wrapper on a clone of the large model, so any sampler (multistep history included) runs across the
switch unchanged; the small model is loaded with ComfyUI's model management at the start of each run."""
import logging
import math
import time

import comfy.model_management
import comfy.patcher_extension
from comfy_api.latest import io

from .guidance import progress

KEY = "stride_tstitch"
CATEGORY = "sampling/stride/accelerators"
WrappersMP = comfy.patcher_extension.WrappersMP


def family(model):
    """What two models must share to be stitched: (parameterization, noise range, latent format and channels,
    model class and conditioning width)."""
    base, config = model.model, model.model.model_config
    ms = model.get_model_object("model_sampling")
    context = {k: v for k, v in config.unet_config.items() if k in ("context_dim", "context_in_dim", "adm_in_channels",
                                                                    "vec_in_dim")}
    return {"parameterization": getattr(base.model_type, "name", "?"),
            "noise range": (round(float(ms.sigma_min), 5), round(float(ms.sigma_max), 5)),
            "latent format": (type(config.latent_format).__name__, getattr(config.latent_format, "latent_channels", None)),
            "conditioning": (type(base).__name__, sorted(context.items()))}


def check_stitchable(large, small):
    a, b = family(large), family(small)
    differ = [f"{k} ({a[k]} vs {b[k]})" for k in a if a[k] != b[k]]
    if differ:
        raise ValueError("Stride T-Stitch: the two models cannot share a trajectory; they differ in "
                         + "; ".join(differ) + ". Stitch models of one family (same latent space, parameterization, "
                         "noise schedule and text encoder)")


class TStitch:
    """The APPLY_MODEL wrapper (small model while progress < fraction) and the OUTER_SAMPLE wrapper (load the small
    model, reset and log the per-run counts)."""

    def __init__(self, small, fraction):
        self.small, self.fraction = small, fraction
        self.reset()

    def reset(self):
        self.small_calls = self.large_calls = 0
        self.small_seconds = self.large_seconds = 0.0

    def outer(self, executor, *args, **kwargs):
        self.reset()
        comfy.model_management.load_models_gpu([self.small])
        try:
            return executor(*args, **kwargs)
        finally:
            total = self.small_calls + self.large_calls
            if total:
                spent = self.small_seconds + self.large_seconds
                speedup = (f"x{self.large_seconds / self.large_calls * total / spent:.2f} measured (against every "
                           "call at the large calls' mean time)" if self.large_calls and spent else "n/a")
                logging.info("Stride T-Stitch: %d of %d model calls by the small model (the first %.0f%% of the noise "
                             "range); %.2f s small, %.2f s large; speedup %s", self.small_calls, total,
                             100 * self.fraction, self.small_seconds, self.large_seconds, speedup)

    def apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                    **kwargs):
        ms = executor.class_obj.model_sampling
        start = time.perf_counter()
        if self.fraction >= 1.0 or progress(ms, float(t.max())) < self.fraction:
            out = self.small.model.apply_model(x, t, c_concat=c_concat, c_crossattn=c_crossattn, control=control,
                                               transformer_options=small_options(self.small, transformer_options), **kwargs)
            self.small_calls += 1
            self.small_seconds += time.perf_counter() - start
            return out
        out = executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        self.large_calls += 1
        self.large_seconds += time.perf_counter() - start
        return out


PER_MODEL = ("wrappers", "patches", "patches_replace")


def small_options(small, transformer_options):
    """The run's options for a call of the small model: its own wrappers and patches in place of the large model's
    (which may include this wrapper, caches keyed by the large model's blocks, or compiled modules)."""
    own = small.model_options.get("transformer_options", {})
    options = {k: v for k, v in transformer_options.items() if k not in PER_MODEL}
    options.update({k: own[k] for k in PER_MODEL if k in own})
    return options


def tstitch(large, small, fraction):
    if not 0.0 <= fraction <= 1.0 or math.isnan(fraction):
        raise ValueError(f"Stride T-Stitch: fraction must be in [0, 1], got {fraction}")
    check_stitchable(large, small)
    patched = large.clone()
    stitch = TStitch(small, fraction)
    patched.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, KEY, stitch.outer)
    patched.add_wrapper_with_key(WrappersMP.APPLY_MODEL, KEY, stitch.apply_model)
    return patched


class StrideTStitch(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StrideTStitch", display_name="T-Stitch small + large model (Stride)", category=CATEGORY,
            description="T-Stitch (Pan et al. 2024): a small model of the same family denoises the first part of the "
                        "noise range (where the layout forms and small models are nearly as good), the large model "
                        "the rest. Works with every sampler and scheduler; each run logs how many calls each model "
                        "made. Both models must share latent space, parameterization, noise schedule and "
                        "conditioning.",
            inputs=[io.Model.Input("model", tooltip="The large model (its output is the result)."),
                    io.Model.Input("small_model", tooltip="A small model of the same family (e.g. a distilled or "
                                                          "pruned sibling)."),
                    io.Float.Input("fraction", default=0.4, min=0.0, max=1.0, step=0.05,
                                   tooltip="Share of the noise range, from pure noise, given to the small model "
                                           "(T-Stitch: about 40% for DiT-S before DiT-XL at no FID loss).")],
            outputs=[io.Model.Output(tooltip="The large model, stitched.")])

    @classmethod
    def execute(cls, model, small_model, fraction) -> io.NodeOutput:
        return io.NodeOutput(tstitch(model, small_model, fraction))


NODES = [StrideTStitch]
