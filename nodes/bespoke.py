"""Bespoke solver nodes (Shaul et al. 2024, arXiv:2310.19075): the calibrate node fits a Bespoke solver to the user's
model (with gradients through it) on the machinery of the calibrated solvers (nodes/calibrated.py: the store, the
text, the checks), the sampler node runs it from its text, and `stride_bespoke` finds a stored one by model,
schedule and cfg. A fit that does not beat its base on held-out calibration noises is refused, never stored."""
import logging

import torch

from comfy_api.latest import io

from ..samplers import bespoke
from ..samplers.schedules.common import held_out_split
from . import calibrated
from .calibration import autograd_weights

TEACHER_POINTS = 24  # the teacher: Stride's UniPC-3 on this many sigmas from the schedule's start to sigma_min,
TEACHER_REFINE = 2   # each interval cut in this many steps


def fit_bespoke(ctx, sigmas, options):
    """The Bespoke calibration on the calibration batch (pure math in samplers/bespoke.py), with the backward passes
    charged to the evaluation count (2 evaluations' worth each) and the weights made differentiable meanwhile."""
    batch = ctx.x.shape[0]
    fit_rows = len(held_out_split(batch, "Bespoke")[0])
    nfe = bespoke.Bespoke.identity(options["base"], sigmas).nfe
    backward = lambda i: ctx.denoiser.charge(2 * nfe * fit_rows / batch)
    with torch.inference_mode(False), autograd_weights(ctx.inner_model.inner_model, "Bespoke"):
        solver, report = bespoke.calibrate(ctx.denoiser, ctx.x.detach().clone(), sigmas, ctx.sigma_min,
                                           ctx.param.flow, options["base"], options["iterations"],
                                           options["learning_rate"], options["lipschitz"], TEACHER_POINTS,
                                           TEACHER_REFINE, progress=backward)
    logging.info("Stride Bespoke: %s at %d NFE: error against the reference %.4g (base %.4g) on the fit noises, %.4g "
                 "(base %.4g) on the held-out noises", options["base"], solver.nfe, report["error"],
                 report["base_error"], report["held_out_error"], report["held_out_base_error"])
    return solver.tensors(), report


def run_bespoke(calibration, values, model, x, sigmas, extra_args, callback, disable, param, overrides):
    solver = bespoke.Bespoke.from_tensors(calibration["options"]["base"], values)
    return bespoke.sample_bespoke(model, x, sigmas, extra_args, callback, disable, solver=solver)


calibrated.METHODS["bespoke"] = "Bespoke"
calibrated.EXTENSIONS["bespoke"] = (fit_bespoke, run_bespoke, False)
calibrated.BASES["bespoke"] = (bespoke.sample_bespoke_base, {"base": "rk2"})

# `stride_*` KSampler names (never rename one): a stored Bespoke solver for the model, schedule and cfg of the run,
# else the uncalibrated midpoint base (ComfyUI's dpm_2), with a warning saying why
KSAMPLERS = {"stride_bespoke": (calibrated.ksampler_function("bespoke"), {})}


def cost(base, steps, samples, iterations):
    """Model evaluations of a calibration, in batches: the teacher, the fit's forward and backward passes on the fit
    half, and the final check of the fitted solver and its base on every noise."""
    nfe = bespoke.Bespoke.identity(base, torch.linspace(1, 0, steps + 1)).nfe
    share = len(held_out_split(samples, "Bespoke")[0]) / samples
    return (TEACHER_POINTS - 1) * TEACHER_REFINE + 1 + iterations * 3 * nfe * share + 2 * nfe


class StrideCalibrateBespoke(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        inputs = calibrated._calibrate_inputs([
            io.Combo.Input("base", options=list(bespoke.BASES), default="rk2",
                           tooltip="The solver the Bespoke transformation starts from (and must beat): rk1 = Euler "
                                   "(1 model evaluation per step), rk2 = midpoint, ComfyUI's dpm_2 (2 per step, 1 on "
                                   "the last: 4 steps cost 7), ei1 = DDIM (the same as Euler on EPS models), ei2 = "
                                   "DPM-Solver++(2S) (the exponential integrators, the same costs; ei2 stays stable "
                                   "where dpm_2 diverges on few karras steps)."),
            io.Int.Input("iterations", default=200, min=0, max=10000,
                         tooltip="Gradient steps on the paper's loss; each costs about 3 model evaluations per "
                                 "solver evaluation (forward and backward) on the fit half of the batch."),
            io.Float.Input("learning_rate", default=0.03, min=0.0001, max=1.0, step=0.001, round=0.0001,
                           tooltip="(expert) Adam's step size on the solver's parameters (log-scales and logits)."),
            io.Float.Input("lipschitz", default=0.0, min=0.0, max=10.0, step=0.1,
                           tooltip="(expert) The slope's Lipschitz constant in the paper's error bound, per unit of "
                                   "sigma / sigma: above 0 weights early steps' errors more. 0 (default) won on every "
                                   "setting measured.")])
        for k, item in enumerate(inputs):
            if item.id == "samples":  # half fit, half judge
                inputs[k] = io.Int.Input("samples", default=8, min=2, max=64,
                                         tooltip="Calibration noises (the batch): the first half fits the solver, "
                                                 "the rest judges it against its base (a fit that loses there is "
                                                 "refused).")
        return io.Schema(
            node_id="StrideCalibrateBespoke", display_name="Calibrate Bespoke solver (Stride)",
            category=calibrated.CATEGORY,
            description="Bespoke solver (Shaul et al., ICLR 2024): per-step learned times and scales (the paper's "
                        "scale-time transformation) on Euler or midpoint, fitted to your model by gradient descent "
                        "on the paper's error bound against a fine reference solve, with gradients through the model "
                        "(the weights are held twice while it runs). Judged on held-out noises: a fit no better than "
                        "its base is refused. Stored, and written as text for the Bespoke sampler's widget.",
            inputs=inputs,
            outputs=[io.String.Output(tooltip="The fitted solver: connect or paste it into the Bespoke sampler node.")])

    @classmethod
    def execute(cls, model, positive, negative, latent_image, cfg, scheduler, steps, samples, seed, base, iterations,
                learning_rate, lipschitz, sigmas=None) -> io.NodeOutput:
        n = steps if sigmas is None else len(sigmas) - 1
        options = {"base": base, "iterations": iterations, "learning_rate": learning_rate, "lipschitz": lipschitz}
        return io.NodeOutput(calibrated._calibrate("bespoke", model, positive, negative, latent_image, cfg, scheduler,
                                                   steps, samples, seed, sigmas, options,
                                                   cost(base, n, samples, iterations) / max(n, 1)))


StrideSamplerBespoke = calibrated._sampler_node(
    "StrideSamplerBespoke", "bespoke", "Bespoke sampler (Stride)",
    "A Bespoke solver (Euler or midpoint with learned times and scales) from its calibration text, for the model, "
    "schedule and cfg it was fitted to. Refuses, with a clear error, a text of another model, steps or schedule.")

NODES = [StrideCalibrateBespoke, StrideSamplerBespoke]
