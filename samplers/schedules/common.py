"""Shared pieces of the schedule optimizers: budgets, the teacher trajectory, the error of a schedule,
log-linear resampling to other step counts, denoise slicing and the shareable schedule text."""
import functools
import json
import math

import torch
from torch.utils.checkpoint import checkpoint

from ..core import FLOW, VE, check_sigmas
from ..multistep import sample_unipc

TEXT_VERSION = 1


class BudgetExceeded(RuntimeError):
    """The optimizer asked for more model evaluations than its calibration budget allows."""


class Counted:
    """A denoiser that counts its evaluations in units of the calibration batch (a batch of B * m rows counts
    m) and reports each to `progress(done, total)`. Exceeding `budget` raises BudgetExceeded."""

    def __init__(self, denoiser, batch, budget=None, progress=None):
        self.denoiser, self.batch, self.budget, self.progress = denoiser, batch, budget, progress
        self.calls = 0.0

    def __call__(self, x, sigma, **kwargs):
        self.charge(x.shape[0] / self.batch)
        return self.denoiser(x, sigma, **kwargs)

    def charge(self, cost):
        """Count `cost` evaluations (raising BudgetExceeded, before any work, when they do not fit)."""
        if self.budget is not None and self.calls + cost > self.budget + 1e-9:
            raise BudgetExceeded(f"needs more than the budget of {self.budget:g} model evaluations")
        self.calls += cost
        if self.progress is not None:
            self.progress(self.calls, self.budget)


def check_steps(steps, name):
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"Stride {name}: steps must be a whole number >= 1, got {steps!r}")


def check_range(sigmas, sigma_min, sigma_max, name):
    """Reject a schedule that leaves the model's noise range (the final 0 excepted)."""
    check_sigmas(sigmas, name)
    inner = sigmas[sigmas > 0]
    tol = 1e-4 * sigma_max
    if len(inner) and (float(inner.max()) > sigma_max + tol or float(inner.min()) < sigma_min - tol):
        raise ValueError(f"Stride {name}: sigmas {float(inner.max()):.4g}..{float(inner.min()):.4g} leave the model's "
                         f"range {sigma_max:.4g}..{sigma_min:.4g}")


def param_of(flow):
    return FLOW if flow else VE


def log_grid(sigma_max, sigma_min, n, flow=False):
    """n sigmas from sigma_max to sigma_min, uniform in the half-log-SNR lambda (VE-ised for flow models, whose
    sigma = 1 end is kept exactly: its lambda is -inf, so the grid starts at FLOW's capped sigma)."""
    param = param_of(flow)
    top = torch.tensor(min(sigma_max, param.sigma_cap) if flow else sigma_max, dtype=torch.float64)
    lams = torch.linspace(float(param.lam(top)), float(param.lam(torch.tensor(sigma_min, dtype=torch.float64))), n,
                          dtype=torch.float64)
    grid = param.sigma_of(lams)
    grid[0], grid[-1] = sigma_max, sigma_min
    return grid


def refined(grid, refine):
    """The grid with each interval cut into `refine` pieces, uniform in log sigma."""
    if refine <= 1:
        return grid.double()
    logs = grid.double().log()
    w = torch.arange(refine, dtype=torch.float64) / refine
    inner = (logs[:-1, None] * (1 - w) + logs[1:, None] * w).flatten()
    return torch.cat([inner.exp(), grid[-1:].double()])


def teacher_trajectory(denoiser, x, grid, flow=False, refine=1):
    """The teacher: Stride's UniPC (order 3, bh2) over the fine grid (descending, > 0), each interval cut into
    `refine` steps, then a final denoise. Returns (xs [K+1, B, ...], ds [K, B, ...]): the state at each grid
    point and at sigma 0 (the output), and the denoiser's output at each grid point."""
    fine = refined(grid, refine)
    sigmas = torch.cat([fine, fine.new_zeros(1)])
    xs, ds = [], []

    def record(info):
        if info["i"] % refine == 0:
            xs.append(info["x"])
            ds.append(info["denoised"])
    out = sample_unipc(denoiser, x, sigmas, callback=record, param=param_of(flow), order=3, variant="bh2")
    return torch.stack(xs + [out]), torch.stack(ds)


def held_out_split(samples, label):
    """(fit rows, held-out rows) of a calibration batch: the first half (rounded up) fits, the rest judges."""
    if samples < 2:
        raise ValueError(f"Stride {label}: at least 2 calibration noises are needed (one to fit, one to judge)")
    k = (samples + 1) // 2
    return torch.arange(k), torch.arange(k, samples)


def in_calls_of(denoiser, k):
    """The denoiser of a stack of copies of a k-row sub-batch, called on k rows at a time (a guided model conditions
    the rows of each call as the first rows of its calibration batch)."""
    def run(x, sigma, **kwargs):
        sigma = torch.as_tensor(sigma).to(x.device).expand(x.shape[0])
        return torch.cat([denoiser(xc, sc, **kwargs) for xc, sc in zip(x.split(k), sigma.split(k))])
    return run


def checkpoint_calls(denoiser):
    """denoiser(x, sigma, **kwargs) gradient-checkpointed: each call keeps no activations until the backward pass,
    which recomputes them one call at a time."""
    # Reentrant: the forward runs without a graph, and the recomputation is an ordinary forward whose saved tensors
    # on the gradient path are copied, because networks edit such tensors in place (ComfyUI's Flux blocks add into
    # their residual stream). Non-reentrant checkpointing keeps references to them there and returns wrong
    # gradients without an error. Always copied: the cost is one recomputed call's activations at most.
    def recomputed(x, sigma, **kwargs):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone() if t.requires_grad else t, lambda t: t):
            return denoiser(x, sigma, **kwargs)
    return lambda x, sigma, **kwargs: checkpoint(functools.partial(recomputed, **kwargs), x, sigma, use_reentrant=True)


def mse(x, target):
    """Mean squared error per sample, over the latent ([B])."""
    return (x.double() - target.double()).flatten(1).pow(2).mean(1)


def resample(sigmas, steps):
    """The schedule (ending in 0) log-linearly interpolated to `steps` steps, as Align Your Steps extends its
    tables: the nonzero sigmas as points at uniform positions in [0, 1], log sigma interpolated linearly."""
    check_steps(steps, "schedule")
    inner = sigmas[:-1].double() if float(sigmas[-1]) == 0 else sigmas.double()
    if len(inner) == steps:
        return torch.cat([inner, inner.new_zeros(1)]).float()
    if len(inner) == 1:
        raise ValueError("Stride schedule: a one-step schedule cannot be resampled to other step counts")
    pos = torch.linspace(0, 1, steps, dtype=torch.float64) * (len(inner) - 1)
    lo = pos.floor().long().clamp(max=len(inner) - 2)
    w = pos - lo
    logs = inner.log()
    out = torch.exp(logs[lo] * (1 - w) + logs[lo + 1] * w)
    return torch.cat([out, out.new_zeros(1)]).float()


def with_denoise(sigmas, denoise):
    """The tail of a full schedule for denoise < 1: its last round(steps * denoise) steps (ComfyUI's AYS/GITS
    convention), so KSampler-style partial denoising starts from a lower sigma."""
    if not 0.0 <= denoise <= 1.0:
        raise ValueError(f"Stride schedule: denoise must be in [0, 1], got {denoise}")
    if denoise >= 1.0:
        return sigmas
    if denoise <= 0.0:
        return sigmas.new_zeros(0)
    return sigmas[-(round((len(sigmas) - 1) * denoise) + 1):]


def schedule_text(sigmas, **meta):
    """The schedule as one line of JSON (sigmas written so that float32 reads them back bit for bit)."""
    values = [float(s) for s in sigmas.float()]
    return json.dumps({"stride_schedule": TEXT_VERSION, **meta, "sigmas": values})


def parse_schedule_text(text):
    """(sigmas as float32, metadata) from schedule_text's JSON, or from a plain comma-separated sigma list."""
    text = text.strip()
    if not text:
        raise ValueError("Stride schedule: the schedule text is empty; paste the text an optimizer node wrote")
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"Stride schedule: the schedule text is not valid JSON ({e})") from None
        if data.get("stride_schedule") != TEXT_VERSION or not isinstance(data.get("sigmas"), list):
            raise ValueError("Stride schedule: not a Stride schedule text (version "
                             f"{data.get('stride_schedule')!r}, expected {TEXT_VERSION} with a 'sigmas' list)")
        values, meta = data.pop("sigmas"), data
    else:
        values, meta = text.replace("[", "").replace("]", "").split(","), {}
    try:
        sigmas = torch.tensor([float(v) for v in values], dtype=torch.float32)
    except (TypeError, ValueError):
        raise ValueError(f"Stride schedule: sigmas must be numbers, got {values!r}") from None
    check_sigmas(sigmas, "schedule")
    if len(sigmas) < 2 or not math.isclose(float(sigmas[-1]), 0.0):
        raise ValueError("Stride schedule: a schedule needs at least two sigmas and must end in 0")
    return sigmas, meta



def nodes_to_floor(init, sigma_min):
    """The N + 1 descending nodes sigma_0 .. sigma_N = sigma_min of an N-step schedule `init` (ending in 0),
    whose last step to 0 stands for the step to sigma_min (the convention of the Align Your Steps tables).
    A schedule already ending at sigma_min is first resampled log-linearly to N + 1 nonzero sigmas."""
    inner = init[:-1].double()
    if float(inner[-1]) <= sigma_min * 1.001:
        inner = resample(torch.cat([inner, inner.new_zeros(1)]), len(inner) + 1)[:-1].double()
        inner[-1] = sigma_min
        return inner
    return torch.cat([inner, inner.new_tensor([sigma_min])])
