"""Running a calibration inside ComfyUI: the user's model, guidance, conditioning and patches become a plain
guided denoiser D(x, sigma) for Stride's pure optimizers, through a KSAMPLER run (ComfyUI's public sampler
path), with a cost estimate before the work, a progress bar, and the evaluations counted."""
import logging
import math
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils

from ..samplers.multistep import sample_unipc
from ..samplers.schedules.common import Counted, log_grid, teacher_trajectory
from .calibration_store import _digest
from .compat import training
from .sampler_bridge import model_param


@dataclass
class Calibration:
    """What an optimizer gets: the counted guided denoiser, the calibration batch at the first sigma, the
    model's noise range and parameterization, and run(name, sigmas, x) for any KSampler sampler by name.
    x is the batch at the schedule's first sigma (the start the calibration was asked for); x_max the same
    noises at sigma_max (model samples are drawn from there)."""
    denoiser: Counted
    x: torch.Tensor
    param: object  # the model's Param (flow or VE)
    sigma_min: float
    sigma_max: float
    run: callable
    inner_model: object  # ComfyUI's CFGGuider; its inner_model is the BaseModel
    x_max: torch.Tensor = None


def conditioning_digest(*conds):
    """A short hash of conditionings (their tensors sampled), so a calibration is tied to its prompts."""
    parts = []
    for cond in conds:
        for tensor, options in cond:
            parts += [tensor] + [v for k in sorted(options) for v in (k, options[k]) if torch.is_tensor(v)
                                 or isinstance(v, (int, float, str))]
    return _digest(parts)


def teacher_grid(model_sampling, points, flow):
    """A fine grid over the model's range: ComfyUI's `simple` (uniform in timestep) for flow models, `karras`
    for the others; the final 0 dropped."""
    return comfy.samplers.calculate_sigmas(model_sampling, "simple" if flow else "karras", points)[:-1].double()


def model_samples(ctx, points=24):
    """Samples of the user's model: its guided ODE solved from the calibration batch (Stride's UniPC-3 on `points`
    sigmas log-spaced over the model's range, from a flow model's capped first sigma), then denoised."""
    top = min(ctx.sigma_max, ctx.param.sigma_cap) if ctx.param.flow else ctx.sigma_max
    grid = torch.exp(torch.linspace(math.log(top), math.log(ctx.sigma_min), points, dtype=torch.float64))
    return teacher_trajectory(ctx.denoiser, ctx.x if ctx.x_max is None else ctx.x_max, grid, ctx.param.flow)[0][-1]


CARRY_POINTS = 16  # the teacher that carries an empty latent's noises from sigma_max down to a schedule's start


def starts_below_max(start, sigma_max):
    return start is not None and float(start) < sigma_max * (1 - 1e-5)


def start_state(x_max, start, noise, latent, base_model, denoiser, param, sigma_max, label):
    """The calibration batch at the schedule's first sigma `start`, as the user's run would start there: an image
    latent (img2img, denoise < 1) noised at `start` by the model's own noise scaling; an empty latent (a schedule
    split after its first steps) carried from sigma_max down to `start` by the teacher (Stride's UniPC-3)."""
    if not starts_below_max(start, sigma_max):
        return x_max
    if torch.count_nonzero(latent) > 0:
        logging.info("Stride %s: the schedule starts at sigma %.4g below the model's %.4g: calibrating on the latent "
                     "noised to it (as img2img / denoise < 1 runs)", label, start, sigma_max)
        latent = base_model.process_latent_in(latent.to(x_max))
        sigma = torch.tensor([float(start)], dtype=x_max.dtype, device=x_max.device)
        return base_model.model_sampling.noise_scaling(sigma, noise.to(x_max), latent)
    logging.info("Stride %s: the schedule starts at sigma %.4g below the model's %.4g: the calibration noises are "
                 "carried down to it by the reference solver first (as a split schedule's first part would)", label,
                 start, sigma_max)
    grid = log_grid(sigma_max, float(start), CARRY_POINTS, param.flow)
    return sample_unipc(denoiser, x_max, grid, param=param, order=3, variant="bh2")


ESTIMATE_AFTER = 3  # evaluations whose median time makes the cost estimate
LOG_EVERY_S = 10.0  # how often a long calibration logs its remaining time


def calibrate(model, positive, negative, latent, cfg, seed, samples, budget, label, fn, capped=True, start=None):
    """fn(Calibration) run inside one ComfyUI sampling pass of the model (a batch of `samples` latents from
    `latent`, noised from `seed`, at sigma `start`: by default the model's sigma_max, see start_state); returns
    (fn's result, evaluations used, seconds). budget caps the model evaluations (capped=False: only an estimate,
    for the progress bar and the cost log)."""
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    reps = math.ceil(samples / latent_image.shape[0])
    latent_image = latent_image.repeat(reps, *[1] * (latent_image.ndim - 1))[:samples]
    noise = comfy.sample.prepare_noise(latent_image, seed)
    ms = model.get_model_object("model_sampling")
    sigmas = torch.tensor([float(ms.sigma_max), float(ms.sigma_min), 0.0])
    if starts_below_max(start, float(ms.sigma_max)) and torch.count_nonzero(latent_image) == 0:
        budget += CARRY_POINTS
    pbar = comfy.utils.ProgressBar(max(int(budget), 1))
    result = {}
    marks = []  # (time, evaluations done) at each evaluation's start
    clock = {"per": None, "logged": 0.0}

    def progress(done, total):
        comfy.model_management.throw_exception_if_processing_interrupted()
        pbar.update_absolute(min(int(done), pbar.total))
        now = time.perf_counter()
        marks.append((now, done))
        if clock["per"] is None and len(marks) > ESTIMATE_AFTER:
            # the first evaluation of a model is often far slower (allocations, caches): the median of the first few
            units = [d1 - d0 for (_, d0), (_, d1) in zip([(0.0, 0.0)] + marks, marks)]  # each evaluation's size
            rates = sorted((t1 - t0) / max(u, 1e-9) for (t0, _), (t1, _), u in zip(marks, marks[1:], units))
            clock["per"], clock["logged"] = rates[len(rates) // 2], now
            logging.info("Stride %s: about %.0f s in all (an evaluation takes %.2f s, the median of the first %d)",
                         label, clock["per"] * pbar.total, clock["per"], ESTIMATE_AFTER)
        elif clock["per"] is not None and now - clock["logged"] >= LOG_EVERY_S:
            clock["logged"] = now
            left = (now - marks[0][0]) / max(done - marks[0][1], 1e-9) * max(pbar.total - done, 0)
            logging.info("Stride %s: %d of about %d model evaluations, about %.0f s to go", label, done, pbar.total,
                         left)

    def sampler_fn(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}
        dtype = x.dtype

        batch = x.shape[0]

        def guided(x_, s_, **kwargs):
            # ComfyUI repeats each conditioning to the batch it is given: a stack of m calibration batches is
            # evaluated batch by batch, so row r keeps the conditioning of calibration sample r % batch.
            chunks = zip(x_.split(batch), s_.split(batch)) if len(x_) % batch == 0 else [(x_, s_)]
            out = torch.cat([model_k(xc.to(dtype), sc.to(dtype), **(kwargs or extra_args)) for xc, sc in chunks])
            if not bool(torch.isfinite(out).all()):
                raise ValueError(f"Stride {label}: the model returned NaN or inf at sigma {float(s_.flatten()[0]):.4g} "
                                 "during the calibration; nothing was stored. Check the model, its patches and "
                                 "its dtype (fp16 overflow), and calibrate again")
            return out.to(x_.dtype)
        counted = Counted(guided, batch, budget if capped else None, progress)
        counted.inner_model = model_k.inner_model  # Stride samplers read the model's parameterization here
        logging.info("Stride %s: calibration of %s %d model evaluations on a batch of %d; the time it takes follows "
                     "after the first %d", label, "up to" if capped else "about", budget, x.shape[0], ESTIMATE_AFTER)
        counted(x, sigmas[:1].expand(x.shape[0]))  # the model's first, cold evaluation (counted)

        def run(name, sigmas_, x_):
            sampler = comfy.samplers.sampler_object(name)
            return sampler.sampler_function(counted, x_.clone(), sigmas_.clone().to(x_.device), extra_args=extra_args,
                                            callback=None, disable=True, **sampler.extra_options)
        param = model_param(model_k)
        x_start = start_state(x, start, noise, latent_image, model_k.inner_model.inner_model, counted, param,
                              float(ms.sigma_max), label)
        ctx = Calibration(counted, x_start, param, float(ms.sigma_min), float(ms.sigma_max), run,
                          model_k.inner_model, x)
        result["value"] = fn(ctx)
        result["calls"] = counted.calls
        return x

    began = time.perf_counter()
    comfy.sample.sample_custom(model, noise, cfg, comfy.samplers.KSAMPLER(sampler_fn), sigmas, positive, negative,
                               latent_image, seed=seed, disable_pbar=True)
    seconds = time.perf_counter() - began
    logging.info("Stride %s: calibration done: %g model evaluations in %.1f s", label, result["calls"], seconds)
    return result["value"], result["calls"], seconds


@contextmanager
def autograd_weights(module, label):
    """ComfyUI loads weights under inference mode, and autograd cannot save inference tensors for the backward
    pass. Inside this context the module's inference-mode parameters and buffers are replaced by ordinary
    copies (one extra copy of the weights while it lasts), and put back after; parameters that require grad
    (older trees create them so) are frozen meanwhile: gradients flow through the weights, never into them.
    ComfyUI's training flag is set meanwhile (nodes/compat.py). A model whose ComfyUI code runs a kernel without a
    backward pass (e.g. a fused rotary kernel on newer trees) is refused with a clear error naming `label`."""
    swapped, frozen = [], [p for p in module.parameters() if p.requires_grad]
    with torch.inference_mode(False):
        for mod in module.modules():
            for store in (mod._parameters, mod._buffers):
                for name, value in list(store.items()):
                    if value is not None and value.is_inference():
                        copy = value.clone()
                        store[name] = torch.nn.Parameter(copy, requires_grad=False) \
                            if isinstance(value, torch.nn.Parameter) else copy
                        swapped.append((store, name, value))
    for p in frozen:
        p.requires_grad_(False)
    try:
        with training():  # newer ComfyUI: kernels with a backward
            yield
    except RuntimeError as e:
        if "no autograd formula" not in str(e):
            raise
        kernel = re.search(r"backward through (\S+)", str(e))
        config = getattr(module, "model_config", module)
        raise ValueError(f"Stride {label}: {type(config).__name__} on this ComfyUI runs a kernel without a backward "
                         f"pass ({kernel.group(1) if kernel else 'a ComfyUI kernel'}), so it cannot be "
                         "differentiated. Use a method that needs no gradient: GITS, AYS or the evolutionary "
                         "schedule search; IIA, DC-Solver or DPM-Solver-v3") from e
    finally:
        for store, name, value in swapped:
            store[name] = value
        for p in frozen:
            p.requires_grad_(True)
