"""DPM-Solver-v3 (Zheng, Lu, Chen & Zhu 2023, arXiv:2310.13268): an exponential integrator whose linear part and
Taylor anchor are fitted to the model, through empirical model statistics (EMS) l, s, b per half-log-SNR.

Written in the VE-ised variables (x~ = x / alpha, sigma~ = sigma / alpha, lambda = -log sigma~), where
dx/dlambda = -sigma eps_hat = -l x - f with f = sigma eps_hat - l x, and f' ~ s f + b. With
L = int l, S = int s, B_r = int_s^r e^-(S - S_s) b and g = e^-(S - S_s) f - B, one step from s to t is
  x_t = e^-(L_t - L_s) [x_s - int_s^t e^(L+S)(r) (f_s + sum_k g^(k) (r - lambda_s)^k / k!) dr - int_s^t e^(L+S) B dr]
(integrals relative to s; the paper's eq. with its cumulative tables). With l = 1, s = b = 0 it is DPM-Solver++.
Derivatives g^(k) use the pseudo-order estimate (k! times the k-th divided difference of the nearest k + 1
points), and the pseudo-corrector redoes each step with the new point among its support (no extra evaluation).

Stride's choices: the EMS integrals are taken on a fine sub-grid between the step's ends (any schedule, no
snapping to the EMS grid); l is estimated with finite-difference Jacobian-vector products (no forward-mode AD
through the model); statistics can be shared over spatial positions (per channel: cheap, resolution-free) or
kept per element.
"""
import math

import torch

from ..core import VE, guarded, log_lowered

SUB_GRID = 33  # points (odd) of the quadrature between a step's ends


def cumtrapz(y, lam):
    """Cumulative trapezoid integral of y [N, ...] over lam [N] (0 at lam[0])."""
    dl = torch.diff(lam).reshape(-1, *[1] * (y.ndim - 1))
    return torch.cat([torch.zeros_like(y[:1]), torch.cumsum(dl * (y[1:] + y[:-1]) / 2, 0)])


def simpson(y, r):
    """Composite Simpson integral of y [M, ...] over the uniform grid r [M] (M odd)."""
    w = torch.ones(len(r), dtype=torch.float64)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    return (w.reshape(-1, *[1] * (y.ndim - 1)) * y).sum(0) * (r[1] - r[0]) / 3


class EMS:
    """Empirical model statistics on an increasing lambda grid: l, s, b of shape [N, C, 1, 1] (per channel) or
    [N, C, H, W] (per element), float64."""

    def __init__(self, lambdas, l, s, b):
        self.lam, self.l, self.s, self.b = (t.double() for t in (lambdas, l, s, b))
        self.S = cumtrapz(self.s, self.lam)
        self.B = cumtrapz(torch.exp(-self.S) * self.b, self.lam)

    @classmethod
    def degenerate(cls, lambdas, shape):
        """l = 1, s = b = 0: DPM-Solver++."""
        n = len(lambdas)
        return cls(lambdas, torch.ones(n, *shape), torch.zeros(n, *shape), torch.zeros(n, *shape))

    def covers(self, lam):
        return float(self.lam[0]) - 1e-6 <= lam <= float(self.lam[-1]) + 1e-6

    def interp(self, name, lam):
        """A statistic or cumulative table at lambda (scalar or [M]), linear between grid points."""
        table = getattr(self, name)
        lam = torch.as_tensor(lam, dtype=torch.float64).reshape(-1)
        pos = torch.searchsorted(self.lam, lam.clamp(self.lam[0], self.lam[-1])).clamp(1, len(self.lam) - 1)
        lo, hi = self.lam[pos - 1], self.lam[pos]
        w = ((lam - lo) / (hi - lo)).reshape(-1, *[1] * (table.ndim - 1))
        out = table[pos - 1] * (1 - w) + table[pos] * w
        return out


def _step_integrals(ems, lam_s, lam_t, order):
    """Relative to s: e^-L_t, int e^(L+S), int e^(L+S) B, and E_k = int e^(L+S) (r - lam_s)^k / k! for k < order."""
    r = torch.linspace(lam_s, lam_t, SUB_GRID, dtype=torch.float64)
    l, s, b = ems.interp("l", r), ems.interp("s", r), ems.interp("b", r)
    big_l, big_s = cumtrapz(l, r), cumtrapz(s, r)
    e = torch.exp(big_l + big_s)
    big_b = cumtrapz(torch.exp(-big_s) * b, r)
    integral = lambda y: simpson(y, r)
    du = (r - lam_s).reshape(-1, *[1] * (l.ndim - 1))
    ek = [integral(e * du ** k / math.factorial(k)) for k in range(order)]
    return torch.exp(-big_l[-1]), ek, integral(e * big_b)


def _g(ems, lam_s, point):
    """g of a stored point (lambda_i, x_i, eps_i) relative to the anchor s: e^(S_s - S_i) f_i - e^S_s (B_i - B_s)."""
    lam_i, x_i, eps_i = point
    sigma_i = math.exp(-lam_i)
    f_i = sigma_i * eps_i - ems.interp("l", lam_i)[0] * x_i
    s_s, s_i = ems.interp("S", lam_s)[0], ems.interp("S", lam_i)[0]
    b_s, b_i = ems.interp("B", lam_s)[0], ems.interp("B", lam_i)[0]
    return torch.exp(s_s - s_i) * f_i - torch.exp(s_s) * (b_i - b_s)


def _derivatives(ems, lam_s, anchor, support, order):
    """[f_s, g^(1), ..., g^(order-1)] by the pseudo-order rule: g^(k) = k! times the k-th divided difference of
    the anchor and the nearest k support points."""
    pts = [anchor] + support
    lams = [p[0] for p in pts]
    gs = [_g(ems, lam_s, p) for p in pts[:order]]
    out = [gs[0]]
    for k in range(1, order):
        table = gs[:k + 1]  # divided differences over the nearest k + 1 points
        for level in range(1, k + 1):
            table = [(table[j + 1] - table[j]) / (lams[j + level] - lams[j]) for j in range(len(table) - 1)]
        out.append(math.factorial(k) * table[0])
    return out


def v3_step(ems, x_s, lam_s, lam_t, derivs):
    """The DPM-Solver-v3 step (VE-ised) from lam_s to lam_t with [f_s, g^(1), ...]."""
    decay, ek, cb = _step_integrals(ems, lam_s, lam_t, len(derivs))
    total = ek[0] * derivs[0] + cb + sum(ek[k] * derivs[k] for k in range(1, len(derivs)))
    return decay * (x_s - total)


def guarded_step(ems, x_s, lam_s, lam_t, derivs):
    """v3_step, kept at its first order where the higher-order step overshoots (core.guarded); and whether it was."""
    high = v3_step(ems, x_s, lam_s, lam_t, derivs)
    return guarded(high, v3_step(ems, x_s, lam_s, lam_t, derivs[:1])) if len(derivs) > 1 else (high, 0)


def sample_dpm_solver_v3(model, x, sigmas, extra_args=None, callback=None, disable=None, param=VE, ems=None,
                         order=2, corrector="on"):
    """DPM-Solver-v3 multistep with the pseudo-corrector. corrector: 'on', 'off', or 'high_noise' (the official
    code's large-guidance setting: only where sigma~ > 1). A step to sigma = 0 is a final denoise."""
    if ems is None:
        raise ValueError("Stride DPM-Solver-v3: no model statistics; calibrate the model first")
    if corrector not in ("on", "off", "high_noise"):
        raise ValueError(f"Stride DPM-Solver-v3: corrector must be 'on', 'off' or 'high_noise', got {corrector!r}")
    extra_args = {} if extra_args is None else extra_args
    sig = param.capped(torch.as_tensor(sigmas, dtype=torch.float64))
    alpha = param.alpha(sig)
    lams = [float(-torch.log(sig[i] / alpha[i])) for i in range(len(sig) - 1)]
    for lam in lams:
        if not ems.covers(lam):
            raise ValueError(f"Stride DPM-Solver-v3: the schedule reaches lambda {lam:.3f}, outside the calibrated "
                             f"range {float(ems.lam[0]):.3f}..{float(ems.lam[-1]):.3f}; recalibrate for this range")
    s_in = x.new_ones([x.shape[0]])
    xb = x.double() / float(alpha[0])
    hist, steps, lowered = [], len(sig) - 1, 0
    for i in range(steps):
        a_i = float(alpha[i])
        denoised = model((xb * a_i).to(x.dtype), sigmas[i] * s_in, **extra_args)
        sigma_i = math.exp(-lams[i])
        eps = (xb - denoised.double()) / sigma_i
        if callback is not None:
            callback({"x": (xb * a_i).to(x.dtype), "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i],
                      "denoised": denoised})
        if float(sig[i + 1]) == 0:
            log_lowered("DPM-Solver-v3", lowered)
            return denoised
        use_corrector = corrector == "on" or (corrector == "high_noise" and sigma_i > 1.0)
        if hist and use_corrector:  # redo the last step with the new point among its support, then fix the cache
            lam_p, x_p, _ = hist[-1]
            k = min(order + 1, len(hist) + 1)
            derivs = _derivatives(ems, lam_p, hist[-1], [(lams[i], xb, eps)] + hist[-2::-1], k)
            x_c, n = guarded_step(ems, x_p, lam_p, lams[i], derivs)
            lowered += n
            eps = eps + ems.interp("l", lams[i])[0] * (x_c - xb) / sigma_i
            xb = x_c
        hist = (hist + [(lams[i], xb, eps)])[-(order + 1):]
        k = min(order, len(hist), steps - i)  # lower order in the warm-up and toward the end
        derivs = _derivatives(ems, lams[i], hist[-1], hist[-2::-1], k)
        lam_t = float(-torch.log(sig[i + 1] / alpha[i + 1]))
        xb, n = guarded_step(ems, xb, lams[i], lam_t, derivs)
        lowered += n
    log_lowered("DPM-Solver-v3", lowered)
    return (xb * float(alpha[-1])).to(x.dtype)


SHRINK = 256  # per-element statistics from K samples are blended with the per-channel ones by K / (K + SHRINK)


def element_weight(samples):
    """The share of per-element statistics in what estimate_ems returns from `samples` model samples."""
    return samples / (samples + SHRINK)


def estimate_ems(denoiser, x0, lambdas, per_channel=True, probes=1, seed=0):
    """EMS on the lambda grid from model samples x0 [K, C, H, W], for the VE-ised denoiser D(x~, sigma~[R]).

    At each grid point x = x0 + sigma eps. l = E[v (sigma d eps_hat/dx) v] = 1 - E[v (dD/dx) v] (Hutchinson with
    Rademacher v; the Jacobian-vector product by central differences). f' is the derivative of
    f = sigma eps_hat - l x along the ODE (dx/dlambda = D - x), by central differences with l interpolated on the
    grid; then s = Cov(f, f') / Var(f) and b = E f' - s E f, over the samples and spatial positions (per channel)
    or over the samples alone (per element; K samples cannot pin D-dimensional statistics down, so they are
    shrunk toward the per-channel ones by K / (K + 256): the paper used K = 1024). Costs (2 probes + 3)
    evaluations of the batch per grid point."""
    gen = torch.Generator().manual_seed(seed)
    x0 = x0.double()
    lambdas = torch.as_tensor(lambdas, dtype=torch.float64)
    channel = lambda t: t.mean(dim=(0, 2, 3), keepdim=True)[0]
    element = lambda t: t.mean(dim=0)
    weight = element_weight(len(x0))
    blend = lambda stat: stat(channel) if per_channel else weight * stat(element) + (1 - weight) * stat(channel)
    d_lam = 0.5 * float(torch.diff(lambdas).min())
    ls, points = [], []
    for lam in lambdas.tolist():
        sigma = math.exp(-lam)
        x = x0 + sigma * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
        vs = [torch.randint(0, 2, x.shape, generator=gen).double() * 2 - 1 for _ in range(probes)]
        delta = 1e-3 * sigma
        batch = torch.cat([x] + [x + delta * v for v in vs] + [x - delta * v for v in vs])
        out = denoiser(batch, torch.full((len(batch),), sigma, dtype=torch.float64)).double().chunk(1 + 2 * probes)
        vjv = sum(v * (out[1 + j] - out[1 + probes + j]) / (2 * delta) for j, v in enumerate(vs)) / probes
        ls.append(blend(lambda mean: mean(1 - vjv)))
        points.append((lam, x, out[0]))
    l_table = torch.stack(ls)
    ems = EMS(lambdas, l_table, torch.zeros_like(l_table), torch.zeros_like(l_table))
    f_at = lambda lam_, x_, d_: (x_ - d_) - ems.interp("l", lam_)[0] * x_
    s_list, b_list = [], []
    for lam, x, d in points:
        slope = d - x
        sig = torch.cat([torch.full((len(x),), math.exp(-(lam + d_lam))), torch.full((len(x),), math.exp(-(lam - d_lam)))])
        d_plus, d_minus = denoiser(torch.cat([x + d_lam * slope, x - d_lam * slope]), sig.double()).double().chunk(2)
        f = f_at(lam, x, d)
        f_prime = (f_at(lam + d_lam, x + d_lam * slope, d_plus) - f_at(lam - d_lam, x - d_lam * slope, d_minus)) / (2 * d_lam)

        def s_and_b(mean):
            var = (mean(f * f) - mean(f) ** 2).clamp_min(1e-12)
            s_j = (mean(f * f_prime) - mean(f) * mean(f_prime)) / var
            return torch.stack([s_j, mean(f_prime) - s_j * mean(f)])
        s_j, b_j = blend(s_and_b)
        s_list.append(s_j)
        b_list.append(b_j)
    return EMS(lambdas, l_table, torch.stack(s_list), torch.stack(b_list))
