"""Multistep exponential integrators in data prediction on the Stride core, with their plug-ins.

DDIM (order 1), DPM-Solver++ 2M/3M (Lu et al. 2022, arXiv:2211.01095) and UniPC bh1/bh2
(Zhao et al. 2023, arXiv:2302.04867) share one loop; DualFast, Heavy-Ball momentum and the Time-Shift
sampler plug into it (see plugins.py). Every step is written in (alpha, sigma, lambda) of the model's Param.
"""
import math

import torch

from .core import VE, History, bcast, exp_step, guarded, log_lowered, per_sample
from .plugins import DualFast, HeavyBall, Plugin, TimeShift

UNIPC_VARIANTS = ("bh1", "bh2")
SOLVER_ORDERS = {"dpmpp": (1, 2, 3), "unipc": (1, 2, 3)}


def check_order(solver, order, variant="bh1"):
    if solver not in SOLVER_ORDERS:
        raise ValueError(f"Stride: unknown solver {solver!r}; choose from {sorted(SOLVER_ORDERS)}")
    if order not in SOLVER_ORDERS[solver]:
        raise ValueError(f"Stride: {solver} supports orders {SOLVER_ORDERS[solver]}, got {order!r}")
    if solver == "unipc" and variant not in UNIPC_VARIANTS:
        raise ValueError(f"Stride: unknown UniPC variant {variant!r}; choose 'bh1' or 'bh2'")


def dpmpp_update(param, x, s, t, hist, order, d0, combine=None):
    """DPM-Solver++ multistep update from s to t; d0 replaces D0 in the first-order term. Order 2 is Alg. 2 of
    the paper (D0 + (D0 - D1) / 2r), whose combined prediction `combine` may transform (momentum); order 3 uses
    the full Taylor terms through three points. A step to sigma = 0 returns d0."""
    if bool((t == 0).all()):
        return d0
    h = param.lam(t) - param.lam(s)
    if order == 3:
        return exp_step(param, x, s, t, [d0] + hist.derivatives(h, 3)[1:])
    c = d0
    if order == 2:
        (r,) = hist.ratios(h, 2)
        c = d0 + (hist.items[0][0] - hist.items[1][0]) / bcast(-2 * r, x)
    return exp_step(param, x, s, t, [combine(c) if combine else c])


def _unipc_coefficients(param, s, t, hist, order, variant):
    """B(h), r_1..r_{p-1}, the predictor rhos (p - 1) and the corrector rhos (p) of UniPC, per sample (float64).
    b_i = i! psi_i(z) / B(h) with z = -h, psi_1 = (e^z - 1)/z - 1, psi_{i+1} = psi_i / z - 1/(i+1)!."""
    h = param.lam(t) - param.lam(s)
    z = -h
    b_h = z if variant == "bh1" else torch.expm1(z)
    rks = hist.ratios(h, order) + [torch.ones_like(h)]
    psi, b = torch.expm1(z) / z - 1.0, []
    for i in range(1, order + 1):
        b.append(psi * math.factorial(i) / b_h)
        psi = psi / z - 1.0 / math.factorial(i + 1)
    b = torch.stack(b, -1)                                                               # [B, p]
    R = torch.stack([torch.stack([r ** i for r in rks], -1) for i in range(order)], -2)  # [B, p, p]
    if order == 1:
        rhos_p, rhos_c = b[:, :0], torch.full_like(b, 0.5)
    else:
        rhos_p = torch.full_like(b[:, :1], 0.5) if order == 2 else torch.linalg.solve(R[:, :-1, :-1], b[:, :-1])
        rhos_c = torch.linalg.solve(R, b)
    return b_h, rks[:-1], rhos_p, rhos_c


def unipc_update(param, x, s, t, hist, order, d0, variant, denoised_t=None):
    """UniP predictor (denoised_t None) or UniC corrector with the model output at t, from state x at s."""
    if bool((t == 0).all()) or (order == 1 and denoised_t is None):
        return exp_step(param, x, s, t, [d0])
    b_h, rks, rhos_p, rhos_c = _unipc_coefficients(param, s, t, hist, order, variant)
    m0 = hist.items[0][0]
    d1s = [(hist.items[k + 1][0] - m0) / bcast(r, x) for k, r in enumerate(rks)]
    x_0 = exp_step(param, x, s, t, [d0])
    alpha_b = param.alpha(t) * b_h
    rhos = rhos_p if denoised_t is None else rhos_c
    res = sum((bcast(rhos[:, k], x) * d for k, d in enumerate(d1s)), torch.zeros_like(x))
    if denoised_t is not None:
        res = res + bcast(rhos_c[:, -1], x) * (denoised_t - m0)
    return x_0 - bcast(alpha_b, x) * res


def sample_exponential(model, x, sigmas, extra_args=None, callback=None, disable=None, param=VE, solver="dpmpp",
                       order=2, variant="bh1", corrector=True, lower_order_final=False, plugins=(), guard=True):
    """The shared multistep loop. solver: 'dpmpp' (DDIM at order 1) or 'unipc'. guard: the divergence guard
    (core.guarded) on every update above order 1 and on the corrector; off, the plain algorithm (ComfyUI's twins).

    Step j (to sigmas[j]) uses order min(order, j) (warm-up), and with lower_order_final also
    min(order, steps + 1 - j). A step to sigma = 0 is a final denoise. UniPC's corrector uses the model
    output at the predicted point, which is also the next step's history entry (no extra evaluation).
    Differentiable in x and sigmas (no no_grad here: ComfyUI samples under inference mode; LD3 backpropagates)."""
    check_order(solver, order, variant)
    extra_args = {} if extra_args is None else extra_args
    # A flow schedule from sigma = 1 starts at lambda = -inf, capped: its first step is huge in lambda (about 7).
    # bh1's B(h) = h grows without bound with it (a corrector weight of about 3.5 there), bh2's 1 - e^-h does not:
    # bh1 skips the corrector of that one step.
    skip_first_corrector = variant == "bh1" and param.flow and bool(sigmas[0] >= 1.0)
    sigmas = param.capped(sigmas)
    steps = len(sigmas) - 1
    plugins = [p for p in plugins if p is not None]
    hist = History(max([order] + [p.history for p in plugins]))
    for p in plugins:
        p.reset(param, sigmas)
    if solver == "dpmpp":
        combine = _chain([p.combine for p in plugins if type(p).combine is not Plugin.combine])
        if combine and order > 2:
            raise ValueError("Stride: momentum applies to DPM-Solver++ of order 1 or 2")
        # momentum averages the solver's own update only: a warm-up step of lower order neither uses nor seeds it
        # (the reference, momentum-diffusion's MomentumDPMSolverMultistepScheduler, starts v at the first 2M step)
        update = lambda *a: dpmpp_update(*a, combine=combine if a[5] == order else None)
    else:
        update = lambda *a: unipc_update(*a, variant=variant)
    keep = guarded if guard else lambda x_high, _: (x_high, 0)
    s, lowered = per_sample(sigmas[0], x), 0
    for i in range(steps):
        t = per_sample(sigmas[i + 1], x)
        denoised = model(x, s.to(x.dtype), **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if solver == "unipc" and corrector and len(hist) > 0 and not bool((t == 0).all()) \
                and not (i == 1 and skip_first_corrector):
            x, n = keep(unipc_update(param, x_prev, s_prev, s, hist, k, d0, variant, denoised_t=denoised), x_first)
            lowered += n
        hist.push(denoised, param.lam(s))
        for p in plugins:
            p.compensate(i, x, hist)
        j = i + 1
        k = min(order, j, steps + 1 - j) if lower_order_final else min(order, j)
        d0 = hist.items[0][0]
        for p in plugins:
            d0 = p.first_order(i, x, s, t, d0)
        x_prev, s_prev = x, s
        x_first = exp_step(param, x, s, t, [d0]) if guard else None  # what the guard falls back to
        x = update(param, x, s, t, hist, k, d0)
        if k > 1:
            x, n = keep(x, x_first)
            lowered += n
        for p in plugins:
            x, t = p.after_step(i, x, t, denoised)
        s = t
    log_lowered({"dpmpp": "DPM-Solver++", "unipc": "UniPC"}[solver], lowered)
    return x


def sample_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, param=VE, dualfast=0.0,
                dualfast_ref="previous", time_shift=None):
    """DDIM (Song et al. 2020, arXiv:2010.02502) as the first-order exponential integrator, with plug-ins."""
    return sample_exponential(model, x, sigmas, extra_args, callback, disable, param, "dpmpp", 1,
                              plugins=_plugins(dualfast, dualfast_ref, None, time_shift))


def sample_dpmpp(model, x, sigmas, extra_args=None, callback=None, disable=None, param=VE, order=2, dualfast=0.0,
                 dualfast_ref="previous", beta=1.0, time_shift=None, guard=True):
    """DPM-Solver++(2M / 3M), data prediction (Lu et al. 2022, arXiv:2211.01095), with plug-ins."""
    return sample_exponential(model, x, sigmas, extra_args, callback, disable, param, "dpmpp", order,
                              plugins=_plugins(dualfast, dualfast_ref, beta, time_shift), guard=guard)


def sample_unipc(model, x, sigmas, extra_args=None, callback=None, disable=None, param=VE, order=3, variant="bh1",
                 corrector=True, lower_order_final=True, dualfast=0.0, dualfast_ref="previous", time_shift=None,
                 guard=True):
    """UniPC, multistep data prediction with UniP-p predictor and UniC corrector (Zhao et al. 2023, 2302.04867)."""
    return sample_exponential(model, x, sigmas, extra_args, callback, disable, param, "unipc", order, variant,
                              corrector, lower_order_final, _plugins(dualfast, dualfast_ref, None, time_shift), guard)


def _plugins(dualfast, dualfast_ref, beta, time_shift):
    """The plug-ins a sampler's options ask for (options are checked even when they leave the base unchanged)."""
    dual, ball = DualFast(dualfast, dualfast_ref), HeavyBall(beta) if beta is not None else None
    return [dual if dualfast else None, ball if beta not in (None, 1.0) else None,
            TimeShift(**time_shift) if time_shift else None]


def _chain(fns):
    if not fns:
        return None
    def run(c):
        for f in fns:
            c = f(c)
        return c
    return run
