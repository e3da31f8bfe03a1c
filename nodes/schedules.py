"""Schedule nodes: the sigma schedule optimized for the user's model, solver and guidance (GITS dynamic
programming, Align Your Steps, LD3, evolutionary search), the schedule shared as text, and a sigma preview.
Every node that outputs SIGMAS also sends them to the frontend, which draws log sigma against the step.
Results go to the calibration store; GITS stores its cost matrix, so a new step count costs nothing."""
import logging

import torch

import comfy.samplers
from comfy_api.latest import io

from ..samplers import multistep
from ..samplers.core import VE
from ..samplers.schedules import ays, evolution, gits, ld3
from ..samplers.schedules.common import (BudgetExceeded, check_range, check_steps, mse, parse_schedule_text,
                                         resample, schedule_text, teacher_trajectory, with_denoise)
from . import calibration_store as store
from .calibration import autograd_weights, calibrate, conditioning_digest, teacher_grid
from .sampler_bridge import KSAMPLERS

CATEGORY = "sampling/stride/schedules"
UI_KEY = "stride_sigmas"  # read by web/stride.js
TEACHER_POINTS = 24       # the teacher's grid for AYS, LD3 and the evolutionary search (UniPC-3: accurate)
MAX_GRID = 64             # GITS: grid points at most; more budget refines the teacher between them


def sigmas_ui(sigmas):
    """The `ui` dict that lets the frontend draw a schedule on the node that produced it."""
    return {UI_KEY: [float(s) for s in sigmas]}


def jump_of(sampler):
    """(GITS jump, half_log_snr) modelling one step of the named sampler. ComfyUI's own dpmpp_2m and uni_pc step
    in -log sigma on flow models; Stride's in the half-log-SNR."""
    stride = sampler.startswith("stride_")
    if "unipc" in sampler or "uni_pc" in sampler:
        return ("unipc" if sampler.endswith("bh2") or "dualfast" in sampler else "unipc_bh1"), stride
    if "dpmpp_2m" in sampler and "sde" not in sampler:
        return "dpmpp_2m", stride
    if sampler not in ("euler", "ddim", "stride_ddim_dualfast"):
        logging.info("Stride GITS: the jumps of %s are modelled as Euler steps (first order)", sampler)
    return "euler", stride


DIFFERENTIABLE = (multistep.sample_ddim, multistep.sample_dpmpp, multistep.sample_unipc)


def student_of(sampler, param):
    """(differentiable Stride twin of the named sampler, its options) for LD3."""
    if sampler in KSAMPLERS and KSAMPLERS[sampler][0] in DIFFERENTIABLE:
        fn, options = KSAMPLERS[sampler]
        return fn, {**options, "param": param}
    # ComfyUI's dpmpp_2m / uni_pc step in -log sigma on every model and have no divergence guard: their twins neither
    if sampler == "dpmpp_2m":
        return multistep.sample_dpmpp, {"order": 2, "param": VE, "guard": False}
    if sampler in ("uni_pc", "uni_pc_bh2"):
        return multistep.sample_unipc, {"order": 3, "variant": "bh2" if sampler.endswith("bh2") else "bh1",
                                        "param": VE, "guard": False}
    if sampler not in ("euler", "ddim"):
        logging.info("Stride LD3: %s has no differentiable twin; its times are learned with DDIM (Euler) steps",
                     sampler)
    return multistep.sample_ddim, {"param": param}


def initial_schedule(model_sampling, flow, scheduler, steps):
    """The schedule the optimizers start from: a ComfyUI scheduler's ('auto': karras, or simple on flow)."""
    name = ("simple" if flow else "karras") if scheduler == "auto" else scheduler
    return comfy.samplers.calculate_sigmas(model_sampling, name, steps).float()


def need(budget, minimum, label, what):
    if budget < minimum:
        raise ValueError(f"Stride {label}: a budget of {budget} model evaluations is too small to optimize; "
                         f"{what} needs at least {minimum}")


def _optimizer_inputs(budget, budget_help):
    return [
        io.Model.Input("model", tooltip="The model the schedule is fitted to (with its LoRAs and patches)."),
        io.Conditioning.Input("positive", tooltip="The conditioning you will sample with."),
        io.Conditioning.Input("negative", tooltip="The negative conditioning you will sample with."),
        io.Latent.Input("latent_image", tooltip="A latent of the size you will sample at (e.g. Empty Latent Image); "
                                                "repeated to the calibration batch."),
        io.Float.Input("cfg", default=5.0, min=0.0, max=100.0, step=0.1, round=0.01,
                       tooltip="The guidance scale you will sample with (the schedule is fitted at it)."),
        io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="dpmpp_2m",
                       tooltip="The sampler you will run with this schedule."),
        io.Int.Input("steps", default=8, min=1, max=200, tooltip="Number of steps of the schedule."),
        io.Int.Input("budget", default=budget, min=1, max=100000, tooltip=budget_help),
        io.Int.Input("samples", default=4, min=1, max=64,
                     tooltip="Calibration noises (a batch): more fit the schedule to more than one image."),
        io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=False,
                     tooltip="Seed of the calibration noises."),
        io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Below 1: the output keeps the last round(steps * denoise) steps, for img2img."),
    ]


def _initial_input():
    return io.Combo.Input("initial", options=["auto"] + comfy.samplers.SCHEDULER_NAMES, default="auto",
                          tooltip="The schedule the search starts from ('auto': karras, or simple on flow models).")


def _outputs():
    return [io.Sigmas.Output(tooltip="The optimized schedule."),
            io.String.Output(tooltip="The schedule as text: paste it into 'Schedule from text (Stride)' to reproduce "
                                     "it in a shared workflow with no model run.")]


def optimize(method, model, positive, negative, latent_image, cfg, sampler_name, budget, samples, seed, denoise,
             extra, fit, finish=None):
    """The shared path of the optimizer nodes: settings and fingerprint, the store (reuse or calibrate and save),
    the text and the denoise tail. fit(ctx, model_sampling) -> (tensors, info); finish(tensors) -> sigmas (for
    stored intermediate results such as GITS's cost matrix; default: tensors["sigmas"])."""
    fp = store.fingerprint(model)
    ms = model.get_model_object("model_sampling")
    settings = {"cfg": cfg, "sampler": sampler_name, "budget": budget, "samples": samples, "seed": seed,
                "latent": list(latent_image["samples"].shape[1:]), "conditioning": conditioning_digest(positive, negative),
                **extra}
    found = store.find(method, settings, fp)
    if found is not None:
        tensors, meta, path = found
        info = meta["info"]
        logging.info("Stride %s: reused %s (no model run)", method, path)
    else:
        (tensors, info), calls, seconds = calibrate(model, positive, negative, latent_image, cfg, seed, samples,
                                                    budget, method, lambda ctx: fit(ctx, ms))
        info = {**info, "evaluations": round(calls, 2), "seconds": round(seconds, 2)}
        store.save(method, settings, fp, tensors, info)
        logging.info("Stride %s: %s", method, info)
    sigmas = finish(tensors) if finish else tensors["sigmas"]
    text = schedule_text(sigmas, method=method, solver=sampler_name, steps=len(sigmas) - 1, cfg=cfg,
                         model=fp["id"], calibration=info)
    out = with_denoise(sigmas, denoise)
    return io.NodeOutput(out, text, ui=sigmas_ui(out))


class StrideScheduleGITS(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StrideScheduleGITS", display_name="Optimal steps by dynamic programming (Stride)",
            category=CATEGORY,
            description="GITS / BOSS: a fine teacher trajectory of your model under your conditioning and guidance, "
                        "the error of every one-step jump between its points (jumps of your sampler: Euler, "
                        "DPM-Solver++ 2M or UniPC type), and the cheapest path of `steps` jumps. The cost matrix is "
                        "stored: another step count or coefficient costs no model run.",
            inputs=_optimizer_inputs(200, "Model evaluations for the teacher: up to 64 grid points, the rest "
                                          "refines the teacher between them.")
            + [io.Float.Input("coeff", default=1.15, min=0.5, max=2.0, step=0.01,
                              tooltip="GITS's weight on the remaining path at each jump: above 1 favours accuracy "
                                      "in the later, low-noise steps (GITS: 1.15 pixel, 1.20 latent models)."),
               io.Combo.Input("metric", options=list(gits.METRICS), default="l2", optional=True,
                              tooltip="(expert) How a jump's error is measured: l2, the L2 norm per image "
                                      "averaged over the batch (GITS's reference code), or mse, the mean squared "
                                      "error (Stride's earlier variant: it spreads the error over the path).")],
            outputs=_outputs())

    @classmethod
    def execute(cls, model, positive, negative, latent_image, cfg, sampler_name, steps, budget, samples, seed,
                denoise, coeff, metric="l2") -> io.NodeOutput:
        check_steps(steps, "GITS")
        if steps > MAX_GRID:
            raise ValueError(f"Stride GITS: at most {MAX_GRID} steps (its teacher grid has {MAX_GRID} points)")
        need(budget, steps + 2, "GITS", f"a grid for {steps} steps")
        jump, half_log_snr = jump_of(sampler_name)
        points = min(MAX_GRID, budget - 1)

        def fit(ctx, ms):
            grid = teacher_grid(ms, points, ctx.param.flow)
            refine = max(1, (budget - 1) // len(grid))
            xs, ds = teacher_trajectory(ctx.denoiser, ctx.x, grid, ctx.param.flow, refine)
            cost = gits.cost_tensor(xs, ds, grid, jump, ctx.param.flow, half_log_snr, metric)
            return {"cost": cost, "grid": grid}, {"grid": len(grid), "refine": refine, "jump": jump}

        def finish(tensors):
            return gits.path_sigmas(tensors["grid"], gits.best_path(tensors["cost"], steps, coeff))
        # the cost matrix does not depend on steps or coeff: stored once for all of them
        return optimize("gits", model, positive, negative, latent_image, cfg, sampler_name, budget, samples, seed,
                        denoise, {"jump": jump, "half_log_snr": half_log_snr, "cost": metric}, fit, finish)


def _teacher_output(ctx, ms):
    grid = teacher_grid(ms, TEACHER_POINTS, ctx.param.flow)
    with torch.no_grad():  # never differentiated (older trees create weights that require grad)
        xs, _ = teacher_trajectory(ctx.denoiser, ctx.x, grid, ctx.param.flow)
    return xs[-1]


def sampler_check(ctx, sampler_name, optimized, init, target, label):
    """(schedule, which) of the optimized and the initial schedule, whichever lands closer to the teacher's output
    when the user's sampler runs it on the calibration noises: a sampler-free objective (AYS's KL bound) can
    still miss for a given sampler. Skipped (optimized kept) when the budget left cannot pay for both runs."""
    try:
        errors = [float(mse(ctx.run(sampler_name, s.to(ctx.x.device), ctx.x), target).mean())
                  for s in (optimized, init)]
    except BudgetExceeded:
        logging.info("Stride %s: no budget left to check the schedule with %s; keeping the optimized one", label,
                     sampler_name)
        return optimized, "optimized"
    if errors[0] <= errors[1]:
        return optimized, "optimized"
    logging.warning("Stride %s: with %s the optimized schedule lands further from the model's own samples than the "
                    "initial one (%.4g vs %.4g on the calibration noises); keeping the initial schedule", label,
                    sampler_name, errors[0], errors[1])
    return init, "initial"


class StrideScheduleAYS(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StrideScheduleAYS", display_name="Align Your Steps for my model (Stride)", category=CATEGORY,
            description="Align Your Steps optimized on your model (any model: flow models through VE-ised "
                        "variables), at your guidance scale: coordinate descent on the KL upper bound between the "
                        "reverse SDE and the solver's linearisation, on samples of your model, with common random "
                        "numbers. The objective does not depend on the sampler; `sampler_name` then checks the "
                        "result: if the initial schedule does better with that sampler on the calibration noises, "
                        "it is kept (with a warning).",
            inputs=_optimizer_inputs(400, "Model evaluations: 24 for samples of the model, then about "
                                          "40 per step and sweep of the coordinate descent.") + [_initial_input()],
            outputs=_outputs())

    @classmethod
    def execute(cls, model, positive, negative, latent_image, cfg, sampler_name, steps, budget, samples, seed,
                denoise, initial) -> io.NodeOutput:
        check_steps(steps, "AYS")
        candidates, points = 4, 2
        sweep = 1 + TEACHER_POINTS + (steps - 1) * (candidates + 1) * 4 * points
        need(budget, sweep, "AYS", f"one sweep of {steps} steps")
        reserve = 4 * steps if budget >= sweep + 4 * steps else 0  # the check with the user's sampler

        def fit(ctx, ms):
            init = initial_schedule(ms, ctx.param.flow, initial, steps)
            target = _teacher_output(ctx, ms)
            ctx.denoiser.budget -= reserve
            sigmas, sweeps = ays.optimize(ctx.denoiser, target, init, ctx.sigma_min, ctx.param.flow, candidates,
                                          sweeps=20, points=points, seed=seed)
            ctx.denoiser.budget += reserve
            sigmas, kept = sampler_check(ctx, sampler_name, sigmas, init, target, "AYS")
            return {"sigmas": sigmas}, {"sweeps": sweeps, "kept": kept}
        return optimize("ays", model, positive, negative, latent_image, cfg, sampler_name, budget, samples, seed,
                        denoise, {"steps": steps, "initial": initial}, fit)


class StrideScheduleLD3(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StrideScheduleLD3", display_name="Learned steps, LD3 (Stride)", category=CATEGORY,
            description="LD3: the times of your sampler learned by gradient descent, so that its output from "
                        "the calibration noises matches a fine teacher solve (latent L2, with LD3's slack on the "
                        "initial noise). Runs the model with gradients: each call is checkpointed, and the "
                        "weights are held twice while it lasts (ComfyUI loads them in inference mode).",
            inputs=_optimizer_inputs(400, "Model evaluations: 24 for the teacher, then 4 per step and iteration "
                                          "(forward, recomputation, backward), and 2 per step for the final "
                                          "check against the initial schedule.") + [_initial_input()],
            outputs=_outputs())

    @classmethod
    def execute(cls, model, positive, negative, latent_image, cfg, sampler_name, steps, budget, samples, seed,
                denoise, initial) -> io.NodeOutput:
        check_steps(steps, "LD3")
        need(budget, 1 + TEACHER_POINTS + 10 * steps, "LD3", f"two iterations of {steps} steps and a check")

        def fit(ctx, ms):
            target = _teacher_output(ctx, ms)
            init = initial_schedule(ms, ctx.param.flow, initial, steps)
            fn, options = student_of(sampler_name, ctx.param)
            solve = lambda model_, x_, sigmas_: fn(model_, x_, sigmas_, **options)
            with torch.inference_mode(False), autograd_weights(ctx.inner_model.inner_model, "LD3"):
                sigmas, loss, first, iters = ld3.optimize(ctx.denoiser, solve, ctx.x, target.clone(), init,
                                                          ctx.sigma_min, ctx.param)
            return {"sigmas": sigmas}, {"iterations": iters, "loss": loss, "initial_loss": first}
        return optimize("ld3", model, positive, negative, latent_image, cfg, sampler_name, budget, samples, seed,
                        denoise, {"steps": steps, "initial": initial}, fit)


class StrideScheduleEvolution(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StrideScheduleEvolution", display_name="Evolutionary step search (Stride)", category=CATEGORY,
            description="AutoDiffusion-style evolutionary search: schedules mutated and crossed over, each scored by "
                        "running your sampler from the calibration noises against a fine teacher solve. Brute "
                        "force, for any sampler; the baseline the other optimizers must beat at equal budget.",
            inputs=_optimizer_inputs(400, "Model evaluations: 24 for the teacher, then `steps` per schedule tried.")
            + [_initial_input(),
               io.Int.Input("population", default=16, min=4, max=256,
                            tooltip="(expert) Schedules per generation; the 5 best survive to the next.")],
            outputs=_outputs())

    @classmethod
    def execute(cls, model, positive, negative, latent_image, cfg, sampler_name, steps, budget, samples, seed,
                denoise, initial, population) -> io.NodeOutput:
        check_steps(steps, "evolution")
        need(budget, 1 + TEACHER_POINTS + population * steps, "evolution", f"one generation of {population}")

        def fit(ctx, ms):
            target = _teacher_output(ctx, ms)
            init = initial_schedule(ms, ctx.param.flow, initial, steps)
            fitness = lambda sigmas: mse(ctx.run(sampler_name, sigmas, ctx.x), target).mean()
            sigmas, err, init_err, tried = evolution.search(fitness, init, ctx.sigma_min, ctx.param.flow,
                                                            population=population, seed=seed)
            return {"sigmas": sigmas}, {"error": err, "initial_error": init_err, "schedules": tried}
        return optimize("evolution", model, positive, negative, latent_image, cfg, sampler_name, budget, samples,
                        seed, denoise, {"steps": steps, "initial": initial, "population": population}, fit)


class StrideScheduleFromText(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StrideScheduleFromText", display_name="Schedule from text (Stride)", category=CATEGORY,
            description="Reproduces a schedule from the text a Stride schedule optimizer wrote (or a plain "
                        "comma-separated list of sigmas ending in 0), with no model run: paste it here and a shared "
                        "workflow gives the same SIGMAS on any machine.",
            inputs=[
                io.String.Input("schedule", multiline=True, default="",
                                tooltip="The schedule text of a Stride optimizer node (JSON), or sigmas like "
                                        "'14.61, 3.86, 1.39, 0.39, 0'."),
                io.Int.Input("steps", default=0, min=0, max=1000,
                             tooltip="0: the stored steps, exactly. Otherwise the schedule is log-linearly "
                                     "interpolated to this many steps (as Align Your Steps extends its tables)."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Below 1: only the last round(steps * denoise) steps, for img2img."),
                io.Model.Input("model", optional=True,
                               tooltip="Optional: checks that the sigmas lie in this model's noise range and warns "
                                       "when the schedule was optimized for another model."),
            ],
            outputs=[io.Sigmas.Output(tooltip="The schedule."),
                     io.String.Output(tooltip="The schedule text, as read.")])

    @classmethod
    def execute(cls, schedule, steps, denoise, model=None) -> io.NodeOutput:
        sigmas, meta = parse_schedule_text(schedule)
        if model is not None:
            ms = model.get_model_object("model_sampling")
            check_range(sigmas, float(ms.sigma_min), float(ms.sigma_max), "schedule")
            model_id = store.fingerprint(model)["id"]
            if meta.get("model") and meta["model"] != model_id:
                logging.warning("Stride schedule: this schedule was optimized for another model (%s, this is %s); "
                                "it stays a valid schedule but is not fitted to this one",
                                meta["model"], model_id)
        if steps:
            sigmas = resample(sigmas, steps)
        sigmas = with_denoise(sigmas, denoise)
        return io.NodeOutput(sigmas, schedule, ui=sigmas_ui(sigmas))


class StrideSigmaPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StrideSigmaPreview", display_name="Sigma preview (Stride)", category="sampling/stride/tools",
            description="Passes SIGMAS through and draws them on the node (log sigma against the step): put it "
                        "after any node that outputs SIGMAS, such as BasicScheduler.",
            inputs=[io.Sigmas.Input("sigmas", tooltip="The schedule to draw.")],
            outputs=[io.Sigmas.Output(tooltip="The same schedule."),
                     io.String.Output(tooltip="The sigmas as a comma-separated list.")],
            is_output_node=True)

    @classmethod
    def execute(cls, sigmas) -> io.NodeOutput:
        text = ", ".join(f"{float(s):.6g}" for s in sigmas)
        logging.info("Stride sigma preview: %d steps: %s", max(len(sigmas) - 1, 0), text)
        return io.NodeOutput(sigmas, text, ui=sigmas_ui(sigmas))


NODES = [StrideScheduleGITS, StrideScheduleAYS, StrideScheduleLD3, StrideScheduleEvolution, StrideScheduleFromText,
         StrideSigmaPreview]
