"""Guidance nodes: CFG schedules that really skip the unconditional pass, and RAAG; as MODEL patches (for
KSampler, composable with other patches) and as GUIDERs (for SamplerCustomAdvanced)."""
import logging
import math

import torch

import comfy.patcher_extension
import comfy.samplers
from comfy_api.latest import io

from ..samplers import guidance
from .runstate import PerRun, Run

KEY = "stride_guidance"
CATEGORY = "sampling/stride/guidance"
WrappersMP = comfy.patcher_extension.WrappersMP


def progress(model_sampling, sigma):
    """How far sigma is through the model's noise range: 0 at sigma_max (pure noise), 1 at sigma = 0, through
    the model's own timestep (the discrete index for SD-style models, sigma itself for flow models). Models
    whose timestep is 0.25 log(sigma) (ComfyUI's continuous EDM / V: negative below sigma 1) use log sigma
    between sigma_min and sigma_max instead, as ComfyUI's percent_to_sigma does for them."""
    timestep = lambda s: float(model_sampling.timestep(torch.as_tensor(s, dtype=torch.float32).reshape(1))[0])
    s, s_min, s_max = float(sigma), float(model_sampling.sigma_min), float(model_sampling.sigma_max)
    if timestep(s_min) < 0:
        p = math.log(s_max / max(s, 1e-12)) / math.log(s_max / s_min)
    else:
        t_max = timestep(s_max)
        p = 1.0 - timestep(s) / t_max if t_max > 0 else 1.0
    return min(max(p, 0.0), 1.0)


def warn_if_distilled(model, what):
    """Guidance-distilled models (Flux-dev style guidance embedding) have no real unconditional branch."""
    config = getattr(getattr(model.model, "model_config", None), "unet_config", {}) or {}
    if config.get("guidance_embed"):
        logging.warning(f"Stride {what}: this model is guidance-distilled (it takes its guidance as an input, like "
                        "Flux-dev); classifier-free guidance on it doubles the cost for a negative prompt it was not "
                        "trained for. Use its own guidance input (FluxGuidance) with cfg 1 instead.")


def log_schedule(label, run):
    if run.calls:
        full, done = 2 * run.calls, 2 * run.calls - run.skipped
        logging.info(f"Stride {label}: unconditional pass skipped in {run.skipped} of {run.calls} denoiser calls; "
                     f"{done} model evaluations instead of {full} (x{full / done:.2f})")


def schedule_patch(model, scale_at, label):
    """A clone of model whose CFG scale at each step is scale_at(model_sampling, sigma, base_cfg); where it is 1
    ComfyUI skips the unconditional pass (its cfg = 1 shortcut, taken per step). Counts are kept per run
    (nodes/runstate.py); the guider's scale is set for one call at a time (under the run's lock)."""
    runs = PerRun(KEY, lambda options: Run(calls=0, skipped=0, warned=False), lambda run: log_schedule(label, run))

    def predict_noise(executor, x, timestep, model_options, seed):
        guider = executor.class_obj
        run = runs.find(model_options.get("transformer_options"), label)
        plain_cfg = isinstance(guider, comfy.samplers.CFGGuider) and "negative" in guider.conds and \
            type(guider).predict_noise is comfy.samplers.CFGGuider.predict_noise  # not BasicGuider, DualCFG, ...
        if run is None or not plain_cfg:
            if run is not None and not run.warned:
                logging.warning(f"Stride {label}: the guider {type(guider).__name__} is not plain CFG with a negative "
                                "conditioning; schedule not applied")
                run.warned = True
            return executor(x, timestep, model_options, seed)
        with run.lock:
            base = guider.cfg
            guider.cfg = scale_at(guider.model_patcher.get_model_object("model_sampling"), timestep[0], base)
            run.calls += 1
            run.skipped += math.isclose(guider.cfg, 1.0) and not model_options.get("disable_cfg1_optimization", False)
            try:
                return executor(x, timestep, model_options, seed)
            finally:
                guider.cfg = base

    patched = model.clone()
    patched.add_wrapper_with_key(WrappersMP.PREDICT_NOISE, KEY, predict_noise)
    patched.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, KEY, runs.outer)
    return patched


def cfg_schedule(kind, start, end, floor, points, points_in):
    """scale_at(model_sampling, sigma, base_cfg) for a schedule's options (errors checked here)."""
    if kind not in guidance.SCHEDULES:
        raise ValueError(f"Stride CFG schedule: unknown schedule {kind!r}; choose from {', '.join(guidance.SCHEDULES)}")
    if kind == "interval" and not 0.0 <= start < end <= 1.0:
        raise ValueError(f"Stride CFG schedule: the interval needs 0 <= start < end <= 1, got {start}, {end}")
    curve = guidance.parse_points(points) if kind == "custom" else None

    def scale_at(model_sampling, sigma, base):
        p = progress(model_sampling, sigma)
        if kind == "custom" and points_in == "sigma":
            return guidance.interpolate(curve, float(sigma), base)
        return guidance.scheduled_scale(kind, p, base, start, end, floor, curve)
    return scale_at


def raag_patch(model, w_max, alpha):
    """A clone of model guided by RAAG (the node's w_max replaces the sampler's cfg). An existing
    sampler_cfg_function (RescaleCFG...) is kept: it runs with RAAG's per-image scale as its cond_scale."""
    previous = model.model_options.get("sampler_cfg_function")
    if getattr(previous, "stride_raag", False):
        raise ValueError("Stride RAAG: this model is already guided by RAAG; apply it once")
    if model.get_wrappers(WrappersMP.PREDICT_NOISE, KEY):
        raise ValueError("Stride RAAG: this model carries a Stride CFG schedule, and RAAG sets its own scale at every "
                         "step (replacing the sampler's cfg), so the schedule would do nothing; use one of the two")
    if previous is not None:
        logging.info("Stride RAAG: the model's existing sampler_cfg_function is kept; it receives RAAG's per-image "
                     "scale as its cond_scale")

    def cfg_function(args):
        w = guidance.raag_scale(args["cond"], args["uncond"], w_max, alpha)
        if previous is None:
            return guidance.guide(args["cond"], args["uncond"], w)
        scale = w.to(args["cond"].dtype).reshape(-1, *[1] * (args["cond"].ndim - 1))
        return previous({**args, "cond_scale": scale})
    cfg_function.stride_raag = True
    patched = model.clone()
    patched.set_model_sampler_cfg_function(cfg_function, disable_cfg1_optimization=True)
    return patched


SCHEDULE_INPUTS = lambda: [
    io.Combo.Input("schedule", options=list(guidance.SCHEDULES), default="interval",
                   tooltip="How the CFG scale follows the noise level (not the step index). constant: the sampler's "
                           "cfg. linear / cosine: ramps from 1 (noise) up, with the same mean as the cfg. "
                           "clamp_linear: the linear ramp, never below `floor`. interval: the cfg inside "
                           "[start, end] of the noise range, 1 outside. custom: your own points. Wherever the "
                           "scale is 1 the unconditional pass is not computed."),
    io.Float.Input("start", default=0.2, min=0.0, max=1.0, step=0.01,
                   tooltip="interval: where guidance starts, as progress through the noise range (0 = pure "
                           "noise, 1 = clean)."),
    io.Float.Input("end", default=0.8, min=0.0, max=1.0, step=0.01,
                   tooltip="interval: where guidance ends (same progress scale)."),
    io.Float.Input("floor", default=1.0, min=0.0, max=30.0, step=0.1,
                   tooltip="clamp_linear: the lowest scale of the ramp. At 1 only the very first step (scale 1) "
                           "skips the unconditional pass; the paper's choice is 2."),
    io.String.Input("points", default="0:1, 0.25:6, 1:6",
                    tooltip="custom: comma-separated position:scale points, interpolated linearly, e.g. "
                            "'0:1, 0.25:6, 1:6' (positions are progress 0-1, or sigmas, see points_in). A scale "
                            "may be 'cfg', the sampler's (or the guider's) cfg: '0:1, 0.25:cfg, 1:cfg'."),
    io.Combo.Input("points_in", options=["progress", "sigma"], default="progress",
                   tooltip="custom: whether the points' positions are progress through the noise range (0 = "
                           "noise, 1 = clean) or the model's sigma values."),
]


class StrideCFGSchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StrideCFGSchedule", display_name="CFG schedule (Stride)", category=CATEGORY,
            description="Makes the CFG scale a function of the noise level, for KSampler or any sampler using plain "
                        "CFG. Wherever the scale is 1 (outside the interval, at the start of a ramp) the "
                        "unconditional pass is really skipped; each run logs how many were skipped.",
            inputs=[io.Model.Input("model", tooltip="The model to patch (other patches are kept).")]
            + SCHEDULE_INPUTS(),
            outputs=[io.Model.Output(tooltip="The model with the CFG schedule.")])

    @classmethod
    def execute(cls, model, schedule, start, end, floor, points, points_in) -> io.NodeOutput:
        warn_if_distilled(model, "CFG schedule")
        if getattr(model.model_options.get("sampler_cfg_function"), "stride_raag", False):
            raise ValueError("Stride CFG schedule: this model is guided by RAAG, which sets its own scale at every "
                             "step (replacing the sampler's cfg), so a CFG schedule on it would do nothing; use one of "
                             "the two")
        scale_at = cfg_schedule(schedule, start, end, floor, points, points_in)
        return io.NodeOutput(schedule_patch(model, scale_at, f"CFG schedule ({schedule})"))


class StrideCFGScheduleGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StrideCFGScheduleGuider", display_name="CFG schedule guider (Stride)", category=CATEGORY,
            description="A CFG guider for SamplerCustomAdvanced whose scale follows the noise level; the "
                        "unconditional pass is skipped wherever the scale is 1.",
            inputs=[io.Model.Input("model", tooltip="The model."),
                    io.Conditioning.Input("positive", tooltip="Positive conditioning."),
                    io.Conditioning.Input("negative", tooltip="Negative (unconditional) conditioning."),
                    io.Float.Input("cfg", default=6.0, min=0.0, max=100.0, step=0.1,
                                   tooltip="The base scale the schedule is built around (custom: where a point's "
                                           "scale is 'cfg').")]
            + SCHEDULE_INPUTS(),
            outputs=[io.Guider.Output()])

    @classmethod
    def execute(cls, model, positive, negative, cfg, schedule, start, end, floor, points, points_in) -> io.NodeOutput:
        if schedule == "custom" and all(scale is not None for _, scale in guidance.parse_points(points)):
            logging.warning("Stride CFG schedule guider: the custom curve %r has fixed scales, so the guider's cfg "
                            "(%g) is not used; write 'cfg' as a scale (e.g. '0:1, 0.25:cfg, 1:cfg') to use it",
                            points, cfg)
        return io.NodeOutput(cfg_guider(StrideCFGSchedule.execute(model, schedule, start, end, floor, points,
                                                                   points_in).result[0], positive, negative, cfg))


def cfg_guider(model, positive, negative, cfg):
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider


RAAG_INPUTS = lambda: [
    io.Float.Input("max_guidance", default=18.0, min=1.0, max=50.0, step=0.1,
                   tooltip="w_max: the scale RAAG tends to when the guidance signal is small relative to the "
                           "unconditional prediction; it replaces the sampler's cfg."),
    io.Float.Input("alpha", default=144.0, min=0.0, max=1000.0, step=1.0,
                   tooltip="How fast the scale drops toward 1 as the paper's RATIO |cond - uncond|^2 / |uncond|^2 "
                           "grows. The default 144 halves the extra scale (w - 1) at |cond - uncond| / |uncond| "
                           "= 1/12, where Stride's earlier alpha 12 on the unsquared ratio did; with alpha 12 on "
                           "the squared RATIO, guidance stays near max_guidance until that ratio reaches about 0.3."),
]


class StrideRAAG(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StrideRAAG", display_name="RAAG guidance (Stride)", category=CATEGORY,
            description="Ratio-aware adaptive guidance (Zhu et al. 2025): per image and step, the scale is "
                        "1 + (max_guidance - 1) exp(-alpha RATIO), RATIO = |cond - uncond|^2 / |uncond|^2 (the "
                        "paper's, squared norms) measured on the ODE slopes (velocities for flow models, noise "
                        "predictions for EPS models). On flow models the ratio is large in the first steps, so "
                        "guidance stays weak where they are sensitive; on EPS models it stays small, and RAAG "
                        "acts close to constant CFG at max_guidance. Replaces the sampler's cfg; an earlier "
                        "sampler_cfg_function patch (RescaleCFG...) runs with RAAG's per-image scale, pre/post-CFG "
                        "patches compose. Refuses a Stride CFG schedule (either order).",
            inputs=[io.Model.Input("model", tooltip="The model to patch.")] + RAAG_INPUTS(),
            outputs=[io.Model.Output(tooltip="The model guided by RAAG.")])

    @classmethod
    def execute(cls, model, max_guidance, alpha) -> io.NodeOutput:
        warn_if_distilled(model, "RAAG")
        return io.NodeOutput(raag_patch(model, max_guidance, alpha))


class StrideRAAGGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StrideRAAGGuider", display_name="RAAG guider (Stride)", category=CATEGORY,
            description="RAAG as a guider for SamplerCustomAdvanced.",
            inputs=[io.Model.Input("model", tooltip="The model."),
                    io.Conditioning.Input("positive", tooltip="Positive conditioning."),
                    io.Conditioning.Input("negative", tooltip="Negative (unconditional) conditioning.")]
            + RAAG_INPUTS(),
            outputs=[io.Guider.Output()])

    @classmethod
    def execute(cls, model, positive, negative, max_guidance, alpha) -> io.NodeOutput:
        return io.NodeOutput(cfg_guider(StrideRAAG.execute(model, max_guidance, alpha).result[0], positive, negative,
                                        max_guidance))


NODES = [StrideCFGSchedule, StrideCFGScheduleGuider, StrideRAAG, StrideRAAGGuider]
