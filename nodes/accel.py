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
                logging.info("Stride T-Stitch: %d of %d model calls by the small model (the first %.0f%% of the noise "
                             "range); %.2f s small, %.2f s large", self.small_calls, total, 100 * self.fraction,
                             self.small_seconds, self.large_seconds)

    def apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                    **kwargs):
        ms = executor.class_obj.model_sampling
        start = time.perf_counter()
        if self.fraction >= 1.0 or progress(ms, float(t.max())) < self.fraction:
            out = self.small.model.apply_model(x, t, c_concat=c_concat, c_crossattn=c_crossattn, control=control,
                                               transformer_options=without_self(transformer_options), **kwargs)
            self.small_calls += 1
            self.small_seconds += time.perf_counter() - start
            return out
        out = executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        self.large_calls += 1
        self.large_seconds += time.perf_counter() - start
        return out


def without_self(transformer_options):
    """The run's options without this wrapper, for the small model's own apply_model (no recursion)."""
    wrappers = transformer_options.get("wrappers", {})
    mine = wrappers.get(WrappersMP.APPLY_MODEL, {})
    if KEY not in mine:
        return transformer_options
    others = {k: v for k, v in mine.items() if k != KEY}
    return {**transformer_options, "wrappers": {**wrappers, WrappersMP.APPLY_MODEL: others}}


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



# --- adaptive step cache ------------------------------------------------------------------------------------------

class StepCache:
    """Adaptive step cache for any model, no calibration: per chunk (cond/uncond set and shape), the relative change
    of the model input since the last computed call is accumulated; while it stays below `threshold` (inside the
    progress window [start, end], at most `max_hits` reuses in a row) the call is answered with the last computed
    ODE slope d = (x - D) / sigma, D = x - sigma d (the velocity or noise prediction held, as step caches reuse
    model outputs). Resets at the start of every run; each run logs its hits and measured time."""

    def __init__(self, threshold, start, end, max_hits):
        self.threshold, self.start, self.end, self.max_hits = threshold, start, end, max_hits
        self.reset()

    def reset(self):
        self.entries, self.hits, self.calls, self.seconds = {}, 0, 0, 0.0

    def outer(self, executor, *args, **kwargs):
        self.reset()
        try:
            return executor(*args, **kwargs)
        finally:
            if self.calls:
                logging.info("Stride step cache: %d of %d model calls answered from the cache (x%.2f fewer); "
                             "%.2f s in the model", self.hits, self.calls, self.calls / max(self.calls - self.hits, 1),
                             self.seconds)

    def apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                    **kwargs):
        self.calls += 1
        key = (tuple(transformer_options.get("cond_or_uncond", [])), tuple(x.shape))
        entry = self.entries.get(key)
        sigma = t.reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype)
        p = progress(executor.class_obj.model_sampling, float(t.max()))
        if entry is not None:
            entry["change"] += float((x - entry["x"]).norm() / entry["x"].norm().clamp_min(1e-12))
            entry["x"] = x
            if (self.start <= p <= self.end and entry["change"] < self.threshold
                    and entry["streak"] < self.max_hits):
                entry["streak"] += 1
                self.hits += 1
                return x - sigma * entry["slope"]
        start = time.perf_counter()
        out = executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        self.seconds += time.perf_counter() - start
        self.entries[key] = {"x": x, "slope": (x - out) / sigma, "change": 0.0, "streak": 0}
        return out


class StrideStepCache(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StrideStepCache", display_name="Adaptive step cache (Stride)", category=CATEGORY,
            description="Reuses the model's last prediction while the model input has changed little since the last "
                        "computed call (accumulated relative change below the threshold), for any model and sampler, "
                        "with no calibration. Cond and uncond passes and latent sizes are cached separately; the "
                        "cache resets at every run, which logs its hits.",
            inputs=[io.Model.Input("model", tooltip="The model to cache."),
                    io.Float.Input("threshold", default=0.1, min=0.0, max=5.0, step=0.01,
                                   tooltip="Accumulated relative input change below which the last prediction is "
                                           "reused (0: never)."),
                    io.Float.Input("start", default=0.2, min=0.0, max=1.0, step=0.05,
                                   tooltip="No reuse before this point of the noise range (0 = pure noise)."),
                    io.Float.Input("end", default=0.9, min=0.0, max=1.0, step=0.05,
                                   tooltip="No reuse after this point of the noise range (the last, detail steps)."),
                    io.Int.Input("max_hits", default=2, min=1, max=10,
                                 tooltip="Reuses in a row at most before the model runs again.")],
            outputs=[io.Model.Output(tooltip="The model with the step cache.")])

    @classmethod
    def execute(cls, model, threshold, start, end, max_hits) -> io.NodeOutput:
        if start > end:
            raise ValueError(f"Stride step cache: start ({start}) must not be after end ({end})")
        cache = StepCache(threshold, start, end, max_hits)
        patched = model.clone()
        patched.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, "stride_step_cache", cache.outer)
        patched.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "stride_step_cache", cache.apply_model)
        return io.NodeOutput(patched)


NODES = [StrideTStitch, StrideStepCache]
