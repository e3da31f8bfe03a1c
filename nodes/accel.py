"""Cache and stitching accelerator nodes.
- T-Stitch (Pan et al. 2024, arXiv:2402.14167): the first part of the noise range denoised by a small model of the
  same family, the rest by the large one, through an APPLY_MODEL wrapper on a clone of the large model, so any
  sampler (multistep history included) runs across the switch; the small model is loaded with ComfyUI's model
  management at the start of each run.
- The adaptive step cache and the calibrated cache plan (InvarDiff, Wu 2025, arXiv:2512.05134), on the runtime in
  nodes/cache.py with the policies of samplers/cache.py."""
import json
import logging
import math
import time

import torch

import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.utils
from comfy_api.latest import io

from ..samplers.cache import Plan, RateMeter, ReuseTest, fit_plan
from ..samplers.core import check_sigmas
from . import calibration_store as store
from .cache import (AdaptivePolicy, Cache, PlanPolicy, family_name, is_unet, no_blocks_reason, units_named,
                    units_of)
from .compat import EXPERT
from .calibration import conditioning_digest
from .guidance import progress
from .runstate import PerRun, Run

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
            "latent format": (type(config.latent_format).__name__,
                              getattr(config.latent_format, "latent_channels", None)),
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
    model; count and log per run, in the run's own state: nodes/runstate.py)."""

    def __init__(self, small, fraction):
        self.small, self.fraction = small, fraction
        self.runs = PerRun(KEY, self.new_run, self.log)

    def new_run(self, options):
        comfy.model_management.load_models_gpu([self.small])
        return Run(small_calls=0, large_calls=0, small_seconds=0.0, large_seconds=0.0, start=time.perf_counter())

    def log(self, run):
        total = run.small_calls + run.large_calls
        if not total:
            return
        estimate = ""
        if run.large_calls and run.small_calls:  # labelled: an estimate from the large calls' mean time
            all_large = run.large_seconds / run.large_calls * total
            estimate = (f"; estimated speedup in the model x{all_large / (run.small_seconds + run.large_seconds):.2f} "
                        f"(against {total} calls at the large calls' mean time)")
        logging.info("Stride T-Stitch: %d of %d model calls by the small model (the first %.0f%% of the noise range); "
                     "run %.2f s wall time; %.2f s small, %.2f s large%s", run.small_calls, total, 100 * self.fraction,
                     time.perf_counter() - run.start, run.small_seconds, run.large_seconds, estimate)

    def apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                    **kwargs):
        run = self.runs.find(transformer_options, "T-Stitch")
        ms = executor.class_obj.model_sampling
        start = time.perf_counter()
        small = self.fraction >= 1.0 or progress(ms, float(t.max())) < self.fraction
        if small and run is not None:
            options = small_options(self.small, transformer_options)
            out = self.small.model.apply_model(x, t, c_concat=c_concat, c_crossattn=c_crossattn, control=control,
                                               transformer_options=options, **kwargs)
        else:
            out = executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        if run is not None:
            elapsed = time.perf_counter() - start
            with run.lock:
                if small:
                    run.small_calls, run.small_seconds = run.small_calls + 1, run.small_seconds + elapsed
                else:
                    run.large_calls, run.large_seconds = run.large_calls + 1, run.large_seconds + elapsed
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
    patched.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, KEY, stitch.runs.outer)
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


# --- caches --------------------------------------------------------------------------------------------------------

PLAN_VERSION = 1


def step_cache(model, threshold, start, end, max_hits, indicator):
    if start > end:
        raise ValueError(f"Stride step cache: start ({start}) must not be after end ({end})")
    blocks = indicator == "first block residual"
    if blocks and is_unet(model):
        raise ValueError(f"Stride step cache: 'first block residual' needs a DiT whose blocks ComfyUI lets a node "
                         f"replace ('dit' block replacements); {family_name(model.model)} is a UNet (no whole-block "
                         "replacement); use 'input change' for this model")
    test = ReuseTest(threshold, start, end, max_hits, accumulate=not blocks)
    # first block residual: the blocks are the ones the model looks up in each call (a model that looks up none
    # falls back to the input change, and each run's log says so)
    policy = AdaptivePolicy(test, "first_block" if blocks else "input")
    return Cache("step cache", [], policy, discover=blocks).patch(model, "stride_step_cache")


class StrideStepCache(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StrideStepCache", display_name="Adaptive step cache (Stride)", category=CATEGORY,
            description="Reuses the model's work while it changes little, for any sampler, with no calibration. "
                        "'input change' (any model): the last prediction is reused while the model input's "
                        "accumulated relative change stays below the threshold. 'first block residual' (DiTs whose "
                        "blocks ComfyUI lets a node replace: Flux, SD3, Wan, Qwen-Image, HunyuanVideo, LTX, "
                        "Mochi...): the first block runs, and while its residual is close to its last computed value "
                        "the "
                        "other blocks add their stored residuals instead of running. Cond and uncond passes and "
                        "latent sizes are cached separately; the cache resets at every run, which logs its reuse "
                        "and measured speedup.",
            inputs=[io.Model.Input("model", tooltip="The model to cache."),
                    io.Float.Input("threshold", default=0.1, min=0.0, max=5.0, step=0.01,
                                   tooltip="Relative change below which stored work is reused (0: never). First "
                                           "block residual: about 0.1 for Flux-style models."),
                    io.Float.Input("start", **EXPERT, default=0.2, min=0.0, max=1.0, step=0.05,
                                   tooltip="No reuse before this point of the noise range (0 = pure noise)."),
                    io.Float.Input("end", **EXPERT, default=0.9, min=0.0, max=1.0, step=0.05,
                                   tooltip="No reuse after this point of the noise range (the last, detail steps)."),
                    io.Int.Input("max_hits", **EXPERT, default=2, min=1, max=10,
                                 tooltip="Reuses in a row at most before the model runs again in full."),
                    io.Combo.Input("indicator", options=["input change", "first block residual"],
                                   default="input change", optional=True,
                                   tooltip="What measures the change: the model input (any model) or the first "
                                           "block's residual (DiTs with ComfyUI block replacement; a model "
                                           "without it falls back to the input change, and the log says so).")],
            outputs=[io.Model.Output(tooltip="The model with the step cache.")])

    @classmethod
    def execute(cls, model, threshold, start, end, max_hits, indicator="input change") -> io.NodeOutput:
        return io.NodeOutput(step_cache(model, threshold, start, end, max_hits, indicator))


def plan_text(fp, sampler_name, call_sigmas, plan, error):
    return json.dumps({"stride_cache_plan": PLAN_VERSION, "model": fp["id"], "sampler": sampler_name,
                       "call_sigmas": [round(s, 7) for s in call_sigmas], **plan.to_json(),
                       "share": round(plan.share(), 4), "error": round(error, 6)})


def parse_plan(text):
    if not (text or "").strip():
        raise ValueError("Stride cache plan: no plan given; connect the calibrate node's plan output or paste its text")
    data = store.parse_text(text, "stride_cache_plan", PLAN_VERSION, "cache plan", "cache plan")
    return data, Plan.from_json(data)


def apply_plan(model, text, fp=None):
    """The model with the plan's cache: refused for another model or another block layout (fp: the model's
    fingerprint, when already taken)."""
    data, plan = parse_plan(text)
    fp = fp or store.fingerprint(model)
    if data["model"] != fp["id"]:
        raise ValueError(f"Stride cache plan: made for model {data['model']}, this model is {fp['id']} (another "
                         "checkpoint, LoRA or patch); calibrate a plan for this model")
    units = units_named(model, plan.units)
    if units is None:
        raise ValueError("Stride cache plan: the plan's blocks do not match this model's; calibrate a plan for it")
    return Cache("cache plan", units, PlanPolicy(plan, data["call_sigmas"])).patch(model, "stride_cache_plan")


def calibrate_plan(model, positive, negative, latent_image, sampler_name, scheduler, steps, cfg, samples, seed,
                   quantile, step_quantile, nonskip, sigmas=None):
    """InvarDiff's calibration on the user's sampler and schedule (ComfyUI's own sampling path): two measuring
    runs (the second with the first plan's stale references), then one run of the plan to measure its error
    against the full result on the calibration noises. Returns the plan text (stored, and reused when stored) and
    the model's fingerprint."""
    if sigmas is not None:
        check_sigmas(sigmas, "cache plan")
    latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
    latent = latent.repeat(-(-samples // latent.shape[0]), *[1] * (latent.ndim - 1))[:samples]
    fp = store.fingerprint(model)
    settings = {"sampler": sampler_name, "scheduler": scheduler, "steps": steps, "cfg": cfg, "samples": samples,
                "seed": seed, "latent": list(latent.shape[1:]), "quantile": quantile, "step_quantile": step_quantile,
                "nonskip": nonskip, "sigmas": None if sigmas is None else [round(float(s), 6) for s in sigmas],
                "conditioning": conditioning_digest(positive, negative)}
    found = store.find("cache_plan", settings, fp)
    if found is not None:
        logging.info("Stride cache plan: reused %s (no model run)", found[2])
        return found[1]["info"]["text"], fp
    noise = comfy.sample.prepare_noise(latent, seed)

    def probe(patched):  # one model call on the calibration inputs: the blocks the model looks up
        comfy.sample.sample(patched, noise[:1], 1, cfg, "euler", "simple", positive, negative, latent[:1],
                            disable_pbar=True, seed=seed)
    units = units_of(model, probe)
    if not units:
        logging.info("Stride cache plan: %s; the plan caches whole calls", no_blocks_reason(model.model))
    names, families = [u[0] for u in units], [u[1] for u in units]
    total = 3 * (len(sigmas) - 1 if sigmas is not None else steps)
    pbar = comfy.utils.ProgressBar(total)
    done = [0]

    def run(patched):
        def callback(*_):
            comfy.model_management.throw_exception_if_processing_interrupted()
            done[0] += 1
            pbar.update_absolute(min(done[0], total))
        return comfy.sample.sample(patched, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                                   sigmas=sigmas, callback=callback, disable_pbar=True, seed=seed)
    seen = {}

    def measure(plan):
        meter = RateMeter(plan)
        cache = Cache("cache plan calibration", units, meter=meter)
        out = run(cache.patch(model, "stride_cache_plan_calibration"))
        if "full" not in seen:
            if not torch.isfinite(out).all():
                raise ValueError("Stride cache plan: the model's result on the calibration noises is not finite; "
                                 "check the model and settings before calibrating")
            seen["full"] = out
            logging.info("Stride cache plan: the first of 3 calibration runs took %.1f s; about %.0f s to go",
                         time.perf_counter() - start, 2 * (time.perf_counter() - start))
        seen["call_sigmas"] = cache.last_run.call_sigmas
        calls = len(seen["call_sigmas"])
        return meter.mean(calls, names), meter.mean(calls, ["step"])[:, 0]
    start = time.perf_counter()
    logging.info("Stride cache plan: calibrating %s with %s, 3 runs of %d steps on a batch of %d (%d blocks)",
                 model.model.__class__.__name__, sampler_name, total // 3, samples, len(units))
    plan = fit_plan(measure, names, families, quantile, step_quantile, nonskip)
    text = plan_text(fp, sampler_name, seen["call_sigmas"], plan, 0.0)
    cached = run(apply_plan(model, text, fp))
    error = float((cached - seen["full"]).norm() / seen["full"].norm().clamp_min(1e-12))
    text = plan_text(fp, sampler_name, seen["call_sigmas"], plan, error)
    seconds = time.perf_counter() - start
    store.save("cache_plan", settings, fp, {"cache": plan.cache, "gate": plan.gate},
               {"text": text, "error": error, "seconds": round(seconds, 2)})
    logging.info("Stride cache plan: %.0f%% of block evaluations planned from the cache, %d gated calls of %d; "
                 "relative error against the full run %.4g on the calibration noises (%.1f s)", 100 * plan.share(),
                 int(plan.gate.sum()), len(plan.gate), error, seconds)
    return text, fp


class StrideCalibrateCachePlan(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StrideCalibrateCachePlan", display_name="Calibrate cache plan (InvarDiff, Stride)",
            category=CATEGORY,
            description="InvarDiff (Wu 2025): measures on your model, sampler and schedule how fast each block's "
                        "output changes from call to call, and caches the blocks (and whole calls) that change "
                        "least, by quantile. DiTs: the blocks the model looks up in ComfyUI's 'dit' block "
                        "replacements (and, where the model names them, their attention); UNets: attention outputs; "
                        "all models: whole calls. The plan is stored and returned as text, so the workflow carries it.",
            inputs=[io.Model.Input("model", tooltip="The model to calibrate (with its LoRAs and patches)."),
                    io.Conditioning.Input("positive", tooltip="Conditioning of the calibration (prompts like yours)."),
                    io.Conditioning.Input("negative", tooltip="Negative conditioning of the calibration."),
                    io.Latent.Input("latent_image", tooltip="A latent of the size you will sample at."),
                    io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                                   tooltip="The sampler you will use (a plan holds for one sampler and schedule)."),
                    io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="simple",
                                   tooltip="The scheduler you will use (ignored when `sigmas` is connected)."),
                    io.Int.Input("steps", default=20, min=3, max=200, tooltip="The number of steps you will use."),
                    io.Float.Input("cfg", default=5.0, min=0.0, max=100.0, step=0.1, round=0.01,
                                   tooltip="The guidance scale you will use."),
                    io.Int.Input("samples", **EXPERT, default=2, min=1, max=16,
                                 tooltip="Calibration noises (the batch)."),
                    io.Int.Input("seed", **EXPERT, default=0, min=0, max=0xffffffffffffffff,
                                 control_after_generate=False, tooltip="Seed of the calibration noises."),
                    io.Float.Input("quantile", default=0.4, min=0.0, max=1.0, step=0.05,
                                   tooltip="About the share of block evaluations cached (InvarDiff's tau; 0: none)."),
                    io.Float.Input("step_quantile", default=0.3, min=0.0, max=1.0, step=0.05,
                                   tooltip="About the share of calls answered whole from the cache (0: none); the "
                                           "call after such a call always computes in full."),
                    io.Float.Input("nonskip", **EXPERT, default=0.1, min=0.0, max=0.9, step=0.05,
                                   tooltip="Share of the first calls never cached (the layout forms there)."),
                    io.Sigmas.Input("sigmas", optional=True,
                                    tooltip="Optional: calibrate for this schedule (SamplerCustom) instead.")],
            outputs=[io.Model.Output(tooltip="The model with the plan applied."),
                     io.String.Output(display_name="plan", tooltip="The plan as text, for the cache plan node.")])

    @classmethod
    def execute(cls, model, positive, negative, latent_image, sampler_name, scheduler, steps, cfg, samples, seed,
                quantile, step_quantile, nonskip, sigmas=None) -> io.NodeOutput:
        text, fp = calibrate_plan(model, positive, negative, latent_image, sampler_name, scheduler, steps, cfg, samples,
                              seed, quantile, step_quantile, nonskip, sigmas)
        return io.NodeOutput(apply_plan(model, text, fp), text)


class StrideCachePlan(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StrideCachePlan", display_name="Cache plan (InvarDiff, Stride)", category=CATEGORY,
            description="Applies a cache plan made by the calibrate node (pasted or connected): the planned blocks "
                        "and calls reuse their last computed outputs. Refused for another model; calls the plan does "
                        "not know (another sampler or schedule) run in full, and the run's log says how many.",
            inputs=[io.Model.Input("model", tooltip="The model the plan was calibrated on."),
                    io.String.Input("plan", multiline=True, default="",
                                    tooltip="The plan text the calibrate node wrote.")],
            outputs=[io.Model.Output(tooltip="The model with the plan applied.")])

    @classmethod
    def execute(cls, model, plan) -> io.NodeOutput:
        return io.NodeOutput(apply_plan(model, plan))


NODES = [StrideTStitch, StrideStepCache, StrideCalibrateCachePlan, StrideCachePlan]
