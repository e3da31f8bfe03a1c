"""Flow-model samplers written in sigma on the slope d = (x - D)/sigma (the velocity for flow models).

The slope is the exact PF-ODE dx/dsigma in both parameterizations, so both samplers also run on EPS models.
"""
import torch

from .core import VE, bcast, guarded, log_lowered, ode_slope


@torch.no_grad()
def sample_flowturbo(model, x, sigmas, extra_args=None, callback=None, disable=None, heun_steps=2):
    """FlowTurbo's Heun + pseudo-corrector blocks (Zhao et al. 2024, arXiv:2409.18128), without the trained refiner.

    The first `heun_steps` steps are Heun steps (2 evaluations); the others are pseudo-corrector steps that
    reuse the slope evaluated at the previous predictor point as their first slope (1 evaluation). A corrected step
    that overshoots its Euler predictor (core.guarded) keeps the predictor.
    A step to sigma = 0 is a final denoise (one evaluation): a schedule of n steps ending at 0 costs
    n + min(heun_steps, n - 1) evaluations. Every step reports to the callback (a pseudo-corrector step with the
    denoised estimate its stale slope implies, x - sigma d)."""
    if heun_steps < 1:
        raise ValueError(f"Stride FlowTurbo: heun_steps must be >= 1 (the first step needs a fresh slope), got {heun_steps}")
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    stale, lowered = None, 0  # the slope at the last predictor point; Euler steps taken by the guard
    for i in range(len(sigmas) - 1):
        s, t = sigmas[i], sigmas[i + 1]
        if stale is None or i < heun_steps or t == 0:
            denoised = model(x, s * s_in, **extra_args)
            d = ode_slope(x, denoised, s)
        else:
            d = stale
            denoised = x - s * d
        if callback is not None:
            callback({"x": x, "i": i, "sigma": s, "sigma_hat": s, "denoised": denoised})
        if t == 0:
            return denoised
        x_pred = x + (t - s) * d
        d_next = ode_slope(x_pred, model(x_pred, t * s_in, **extra_args), t)
        x, n = guarded(x + (t - s) * (d + d_next) / 2, x_pred)
        stale, lowered = d_next, lowered + n
    log_lowered("FlowTurbo", lowered)
    return x


@torch.no_grad()
def sample_mixed_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, param=VE, eta=0.7,
                     window=(0.0, 0.3), noise_sampler=None):
    """Mixed ODE/SDE sampling (the windowed scheme of MixGRPO, Li et al. 2025, arXiv:2507.21802): steps whose
    index lies in window = (start, end) (fractions of the steps) take a reverse-SDE Euler-Maruyama step with the
    same marginals as the PF-ODE, the others an Euler ODE step:
        score = -(x - alpha D) / sigma^2,   x' = x + dsigma (d - eta^2/2 score) + eta sqrt(-dsigma) xi.
    noise_sampler(sigma, sigma_next) gives unit Gaussian noise (ComfyUI's, seeded from the run's seed)."""
    start, end = window
    if not 0.0 <= start < end <= 1.0:
        raise ValueError(f"Stride mixed SDE: window must satisfy 0 <= start < end <= 1, got {window}")
    if eta < 0:
        raise ValueError(f"Stride mixed SDE: eta must be >= 0, got {eta}")
    if noise_sampler is None:
        raise ValueError("Stride mixed SDE: a noise_sampler is required (the node bridge seeds it from the run)")
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    steps = len(sigmas) - 1
    for i in range(steps):
        s, t = sigmas[i], sigmas[i + 1]
        denoised = model(x, s * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": s, "sigma_hat": s, "denoised": denoised})
        d = ode_slope(x, denoised, s)
        if t == 0 or not start <= i / steps < end or eta == 0:
            x = x + (t - s) * d
            continue
        alpha = param.alpha(torch.as_tensor(s, dtype=torch.float64))
        score = -(x - bcast(alpha, x) * denoised) / s ** 2
        x = x + (t - s) * (d - eta ** 2 / 2 * score) + eta * (s - t).sqrt() * noise_sampler(s, t)
    return x
