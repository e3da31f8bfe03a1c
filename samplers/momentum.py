"""Momentum samplers in sigma (Wizadwongsa et al. 2024, "Diffusion Sampling with Momentum", arXiv:2307.11118).

They step x_{n+1} = x_n + (sigma_{n+1} - sigma_n) u_n on the PF-ODE slope d = (x - D)/sigma, which is exact for
a constant D in both parameterizations (the flow velocity for flow models), so no Param is needed.
Adams-Bashforth weights assume equal steps, as PLMS does; warm-up uses lower orders; a step to sigma = 0
is a final denoise.
"""
import math

import torch

from .core import ode_slope

# Adams-Bashforth weights, newest first.
AB = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def ghvb_weights(k, beta):
    """GHVB's beta-dependent Adams-Bashforth weights on the last k velocities, newest first (beta = 1: AB_k)."""
    b = beta
    table = {1: (1.0,), 2: ((2 + b) / (2 * b), -(2 - b) / (2 * b)),
             3: ((18 + 5 * b) / (12 * b), -(24 - 8 * b) / (12 * b), (6 - b) / (12 * b)),
             4: ((46 + 9 * b) / (24 * b), -(78 - 19 * b) / (24 * b), (42 - 5 * b) / (24 * b), -(10 - b) / (24 * b))}
    return table[k]


def _combine(weights, items):
    return sum(w * v for w, v in zip(weights, items))


def _loop(model, x, sigmas, extra_args, callback, direction):
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if sigmas[i + 1] == 0:
            return denoised  # the final denoise
        x = x + (sigmas[i + 1] - sigmas[i]) * direction(ode_slope(x, denoised, sigmas[i]))
    return x


@torch.no_grad()
def sample_plms_hb(model, x, sigmas, extra_args=None, callback=None, disable=None, order=2, beta=0.8):
    """PLMS (order 1-4) with Heavy-Ball momentum: v_n = (1 - beta) v_{n-1} + beta AB_k(d_n, ...), step along v_n."""
    if order not in AB:
        raise ValueError(f"Stride PLMS-HB: order must be 1-4, got {order!r}")
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"Stride PLMS-HB: beta must lie in (0, 1], got {beta}")
    slopes, v = [], [None]

    def direction(d):
        slopes.insert(0, d)
        del slopes[order:]
        p = _combine(AB[len(slopes)], slopes)
        v[0] = p if v[0] is None else (1 - beta) * v[0] + beta * p
        return v[0]
    return _loop(model, x, sigmas, extra_args, callback, direction)


@torch.no_grad()
def sample_ghvb(model, x, sigmas, extra_args=None, callback=None, disable=None, order=2.5):
    """Generalized Heavy Ball with fractional order q: k = ceil(q), beta = q - floor(q) (1 for integer q);
    v_n = (1 - beta) v_{n-1} + beta d_n, then GHVB's beta-weighted AB_k mix of the last k velocities."""
    if not 0.0 < order <= 4.0:
        raise ValueError(f"Stride GHVB: order must lie in (0, 4], got {order}")
    k = math.ceil(order)
    beta = order - math.floor(order) or 1.0
    velocities = []

    def direction(d):
        v = d if not velocities else (1 - beta) * velocities[0] + beta * d
        velocities.insert(0, v)
        del velocities[k:]
        return _combine(ghvb_weights(len(velocities), beta), velocities)
    return _loop(model, x, sigmas, extra_args, callback, direction)
