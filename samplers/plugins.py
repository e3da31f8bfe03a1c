"""Solver plug-ins for the multistep loop (multistep.py): zero-NFE changes to a base solver's step.

A plug-in sees the run through five hooks: reset (start of a run), compensate (the multistep buffer, after the
newest model output and any corrector, before the step: it may rewrite the newest entry), first_order (the
value the first-order term uses), combine (DPM-Solver++'s combined data prediction, orders 1-2) and
after_step (the new state and its sigma). `history` asks for a longer buffer. State lives on the plug-in and
is reset at the start of every run.
"""
import torch

from .core import bcast

class Plugin:
    history = 0  # buffer entries the plug-in needs (beyond the solver's order)

    def reset(self, param, sigmas):
        self.param, self.sigmas = param, sigmas

    def compensate(self, i, x, hist):
        pass

    def first_order(self, i, x, s, t, d0):
        return d0

    def combine(self, c):
        return c

    def after_step(self, i, x, t, denoised):
        return x, t


class DualFast(Plugin):
    """DualFast (Yu et al. 2025, arXiv:2506.13058): reduce the approximation error of the first-order term by
    extrapolating the noise prediction away from a cached, noisier one:
        eps~_i = (1 + c_i) eps_i - c_i eps_tau,   i.e.   D~_i = (1 + c_i) D_i - c_i (x_i - sigma_i eps_tau) / alpha_i.
    Higher-order terms keep the raw predictions, and the history stores raw predictions.
    The paper publishes no schedule in code; Stride's choice, from its statement that the approximation error
    shrinks with noise and the weight grows toward low noise: c_i = strength * i / (N - 1) (0 at the first step,
    `strength` at the final denoise), tau = the previous step ("previous") or the first step ("first")."""

    def __init__(self, strength, ref="previous"):
        if ref not in ("previous", "first"):
            raise ValueError(f"Stride DualFast: reference step must be 'previous' or 'first', got {ref!r}")
        if not 0.0 <= strength <= 2.0:
            raise ValueError(f"Stride DualFast: strength must lie in [0, 2], got {strength}")
        self.strength, self.ref = strength, ref

    def reset(self, param, sigmas):
        super().reset(param, sigmas)
        self.eps_tau = None

    def first_order(self, i, x, s, t, d0):
        eps = self.param.eps(x, d0, s)
        if self.eps_tau is None:
            self.eps_tau = eps
            return d0
        c = self.strength * i / max(len(self.sigmas) - 2, 1)
        mixed = (1 + c) * d0 - c * (x - bcast(s, x) * self.eps_tau) / bcast(self.param.alpha(s), x)
        if self.ref == "previous":
            self.eps_tau = eps
        return mixed


class HeavyBall(Plugin):
    """Heavy-Ball momentum on DPM-Solver++(2M) (Wizadwongsa et al. 2024, arXiv:2307.11118): the combined data
    prediction c_n is averaged, v_n = (1 - beta) v_{n-1} + beta c_n, and the step uses v_n (beta = 1: plain 2M).
    Only steps of the solver's full order are averaged: 2M's first-order warm-up step neither uses nor seeds v."""

    def __init__(self, beta):
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"Stride Heavy Ball: beta must lie in (0, 1], got {beta}")
        self.beta = beta

    def reset(self, param, sigmas):
        super().reset(param, sigmas)
        self.v = None

    def combine(self, c):
        self.v = c if self.v is None else (1 - self.beta) * self.v + self.beta * c
        return self.v


class TimeShift(Plugin):
    """Time-Shift sampler (Li et al. 2024, arXiv:2305.15583): after a step, the state is given the noise level
    whose predicted variance matches its measured one, searched within a window around the nominal sigma.

    Stride's adaptation to latents and flow models: the expected per-sample variance at sigma is
    alpha(sigma)^2 Var(x0_hat) + sigma^2 (the paper compares with 1 - alpha_bar only, i.e. unit-variance data
    and VP scaling); x0_hat is the step's denoised prediction. The window is `window` times the step's
    length in lambda, centred on the nominal sigma and kept strictly between its neighbours; the shifted
    sigma then replaces the nominal one for the next model call, the next step and the history (as the
    paper's DPM-Solver variant does). The relabelled state keeps its values in the model's own parameterization,
    so on a flow model this is not the same operation as on its VE-rescaled twin. Shifting stops once `cutoff` of the steps are done, and the first
    step and the final denoise are never shifted."""

    CANDIDATES = 33

    def __init__(self, window=0.3, cutoff=0.7):
        if not 0.0 < window <= 1.0:
            raise ValueError(f"Stride Time-Shift: window must lie in (0, 1] (a fraction of the step), got {window}")
        if not 0.0 <= cutoff <= 1.0:
            raise ValueError(f"Stride Time-Shift: cutoff must lie in [0, 1] (a fraction of the steps), got {cutoff}")
        self.window, self.cutoff = window, cutoff

    def after_step(self, i, x, t, denoised):
        steps = len(self.sigmas) - 1
        j = i + 1
        if i == 0 or j >= steps - 1 or j > self.cutoff * steps or float(self.sigmas[j + 1]) == 0:
            return x, t
        lam = self.param.lam
        nominal = self.sigmas[j].double()
        lo, hi = lam(self.sigmas[j - 1].double()), lam(self.sigmas[j + 1].double())
        h = lam(nominal) - lo
        u = torch.linspace(-0.5, 0.5, self.CANDIDATES, dtype=torch.float64, device=nominal.device)
        cand = (lam(nominal) + u * self.window * h).clamp(lo + 1e-3 * h, hi - 1e-3 * h)
        sig = self.param.sigma_of(cand).to(x.device)                        # [C]
        var_x = x.double().flatten(1).var(1)                                # [B]
        var_0 = denoised.double().flatten(1).var(1)
        predicted = self.param.alpha(sig)[None] ** 2 * var_0[:, None] + sig[None] ** 2
        best = (var_x[:, None] - predicted).abs().argmin(1)
        return x, sig[best]
