"""Improved Integration Approximation (IIA; Zhang, Niwa & Kleijn, ICLR 2024, arXiv:2304.11328): the base step
plus a linear correction with per-step coefficients fitted by least squares against the same solver run on
finer steps,  x_{i+1} = Phi(x_i) + sum_k gamma_{i,k} u_k.

Correction terms (the paper's families; its exact indices are not public, these are Stride's choice):
DDIM and DPM-Solver++ (data prediction): u = (D_i - D_{i-1}, eps_i - eps_{i-1});
Heun (Euler/Heun-type, sigma space): u = (D_i - D_{i-1}, (d'_i - d_i) (sigma_{i+1} - sigma_i)), which frees
Heun's 1/2-1/2 weights. The first step has no previous output and is not corrected.

The paper fits each step to the base solver on finer steps from the step's start (a local target). Stride also
offers the reference trajectory at the step's end as the target (the default in its node): on the oracle and the
trained networks the local fit often raised the final error, the reference fit lowered it several-fold.
"""
import torch

from ..core import VE, ode_slope
from ..multistep import sample_exponential
from ..plugins import Plugin

BASES = ("ddim", "dpmpp_2m", "heun")


class IIACorrection(Plugin):
    """The correction as a plug-in on the exponential-integrator loop (DDIM, DPM-Solver++)."""

    def __init__(self, gammas, record=None):
        self.gammas, self.record = gammas, record

    def reset(self, param, sigmas):
        super().reset(param, sigmas)
        self.prev = None

    def first_order(self, i, x, s, t, d0):
        cur = (d0, self.param.eps(x, d0, s))
        self.terms = None if self.prev is None else [cur[0] - self.prev[0], cur[1] - self.prev[1]]
        self.prev = cur
        return d0

    def after_step(self, i, x, t, denoised):
        return correct(self, i, x), t


def correct(state, i, base):
    """base + the step's correction; records (base, terms) for the fit."""
    if state.record is not None:
        state.record[i] = (base, state.terms)
    gammas = state.gammas[i] if i < len(state.gammas) else None
    if state.terms is None or gammas is None:
        return base
    return base + sum(g * u for g, u in zip(gammas, state.terms))


class _HeunState:
    def __init__(self, gammas, record):
        self.gammas, self.record, self.terms = gammas, record, None


def sample_heun_iia(model, x, sigmas, extra_args=None, callback=None, disable=None, gammas=(), record=None):
    """Heun's method in sigma (the last step to 0 a final denoise), with the IIA correction."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    state, prev = _HeunState(list(gammas), record), None
    for i in range(len(sigmas) - 1):
        s, t = sigmas[i], sigmas[i + 1]
        denoised = model(x, s * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": s, "sigma_hat": s, "denoised": denoised})
        d = ode_slope(x, denoised, s)
        if t == 0:
            base, slope_term = denoised, torch.zeros_like(x)
        else:
            x_pred = x + (t - s) * d
            d_next = ode_slope(x_pred, model(x_pred, t * s_in, **extra_args), t)
            base = x + (t - s) * (d + d_next) / 2
            slope_term = (d_next - d) * (t - s)
        state.terms = None if prev is None else [denoised - prev, slope_term]
        prev = denoised
        x = correct(state, i, base)
    return x


def sample_iia(model, x, sigmas, extra_args=None, callback=None, disable=None, param=VE, base="dpmpp_2m",
               gammas=(), record=None):
    """The IIA sampler on `base` ('ddim', 'dpmpp_2m' or 'heun') with per-step coefficients `gammas`
    (a list of per-step lists; missing or None: no correction)."""
    if base not in BASES:
        raise ValueError(f"Stride IIA: unknown base solver {base!r}; choose from {BASES}")
    if base == "heun":
        return sample_heun_iia(model, x, sigmas, extra_args, callback, disable, gammas, record)
    return sample_exponential(model, x, sigmas, extra_args, callback, disable, param, "dpmpp",
                              1 if base == "ddim" else 2, plugins=[IIACorrection(list(gammas), record)])


def fine_sigmas(s, t, sub_steps, sigma_min):
    """sub_steps sigmas from s to t, uniform in log sigma (to sigma_min, then 0, when t is 0; a final step from
    sigma_min itself is a denoise at any resolution)."""
    if t == 0 and float(s) <= sigma_min * (1 + 1e-6):
        return torch.tensor([float(s), 0.0], dtype=torch.float64)
    end = sigma_min if t == 0 else float(t)
    n = sub_steps if t != 0 else max(sub_steps - 1, 1)
    fine = torch.exp(torch.linspace(torch.log(torch.as_tensor(float(s))), torch.log(torch.as_tensor(end)), n + 1,
                                    dtype=torch.float64))
    fine[0], fine[-1] = float(s), end  # the step's own sigmas, exactly
    return torch.cat([fine, fine.new_zeros(1)]) if t == 0 else fine


def least_squares(terms, residual):
    """gamma minimising |residual - sum_k gamma_k u_k|^2 + ridge (normal equations; the ridge, 1e-4 of the terms'
    mean energy, tames nearly collinear terms, e.g. the first steps, and terms that vanish)."""
    a = torch.stack([u.double().flatten() for u in terms], 1)
    b = residual.double().flatten()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError("Stride IIA: the calibration run is not finite; check the model and the schedule")
    gram = a.T @ a
    gram = gram + 1e-4 * gram.diagonal().mean().clamp_min(1e-30) * torch.eye(len(terms), dtype=gram.dtype)
    return torch.linalg.solve(gram, a.T @ b).tolist()


def fit_gammas(model, x, sigmas, sigma_min, param=VE, base="dpmpp_2m", sub_steps=8, reference=None):
    """Per-step least squares, in order along the coarse run: the IIA sampler (with the coefficients fitted so
    far) brings the calibration batch to x_i; the base solver over `sub_steps` finer steps from x_i to
    sigma_{i+1} is the target (or reference[i + 1], the reference state there, when given);
    gamma_i = argmin |target - Phi(x_i) - sum_k gamma_k u_k|^2 over the batch.
    model should be a Memo (each prefix is rerun). Returns gammas (None for the uncorrected first step)."""
    steps = len(sigmas) - 1
    gammas = [None] * steps
    for i in range(1, steps):
        record, states = {}, {}
        sample_iia(model, x, sigmas[:i + 2], param=param, base=base, gammas=gammas, record=record,
                   callback=lambda info: states.__setitem__(info["i"], info["x"]))
        phi, terms = record[i]
        if reference is not None:
            target = reference[i + 1]
        else:
            target = sample_iia(model, states[i], fine_sigmas(sigmas[i], sigmas[i + 1], sub_steps, sigma_min),
                                param=param, base=base)
        gammas[i] = least_squares(terms, target - phi)
    return gammas
