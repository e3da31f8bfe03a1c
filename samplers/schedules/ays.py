"""Align Your Steps (Sabour, Fidler & Kreis 2024, arXiv:2404.14507): the schedule minimising the KL upper bound
between the reverse SDE and the solver's linearisation, whose denoiser is frozen at each interval's start:
KLUB_i = E int_{sigma_{i+1}}^{sigma_i} sigma^-3 |D(x_sigma, sigma) - D(x_{sigma_i}, sigma_i)|^2 dsigma
(VE variables), estimated with common random numbers and minimised by coordinate descent.

Flow models are VE-ised: x~ = x / (1 - sigma), sigma~ = sigma / (1 - sigma), D unchanged.
"""
import torch

from ..core import bcast
from .common import BudgetExceeded, nodes_to_floor


def to_ve(sigma, flow):
    return sigma / (1 - sigma) if flow else sigma


def from_ve(sigma, flow):
    return sigma / (1 + sigma) if flow else sigma


def ve_denoiser(denoiser, flow):
    """D as a function of VE variables (x~, sigma~)."""
    if not flow:
        return denoiser
    return lambda x, s: denoiser(x * bcast(1 / (1 + s), x), s / (1 + s))


class KLUB:
    """KLUB_i estimates on fixed draws: data x0 [B], noises eps, eps' and stratified positions u in (0, 1)."""

    def __init__(self, denoiser, x0, points=2, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.denoiser, self.x0 = denoiser, x0.double()
        self.u = (torch.arange(points, dtype=torch.float64) + 0.5) / points
        self.eps = torch.randn((points, *x0.shape), generator=gen, dtype=torch.float64)
        self.eps2 = torch.randn((points, *x0.shape), generator=gen, dtype=torch.float64)

    def __call__(self, lo, hi):
        """KLUB of the interval (lo, hi) in VE sigmas, importance-sampled from the weight itself: sigma has the
        density Z^-1 sigma^-3 on (lo, hi), Z = (lo^-2 - hi^-2) / 2, at stratified quantiles u, so KLUB = Z E|dD|^2.
        (Sampling uniform in log sigma instead misses the low end of wide intervals, where the weight is, and
        lets the descent stack nodes at the top of a flow model's range.)"""
        lo, hi = torch.as_tensor(lo, dtype=torch.float64), torch.as_tensor(hi, dtype=torch.float64)
        inv_lo, inv_hi = lo ** -2, hi ** -2
        sig = (inv_lo - self.u * (inv_lo - inv_hi)) ** -0.5                          # [P]
        x0 = self.x0.expand(len(sig), *self.x0.shape)
        x_s = x0 + bcast(sig, x0) * self.eps
        x_b = x_s + bcast(torch.sqrt(hi ** 2 - sig ** 2), x0) * self.eps2
        rows = x_s.flatten(0, 1), x_b.flatten(0, 1)
        batch = self.x0.shape[0]
        sigmas = torch.cat([sig.repeat_interleave(batch), hi.expand(len(sig) * batch)])
        dx = self.denoiser(torch.cat(rows).to(self.x0.dtype), sigmas)
        d_s, d_b = dx.double().chunk(2)
        err = (d_s - d_b).flatten(1).pow(2).mean(1).view(len(sig), batch).mean(1)
        return float((inv_lo - inv_hi) / 2 * err.mean())


def _candidates(lo, cur, hi, window, n):
    """n log-spaced values inside (lo, hi) around cur, spanning `window` of the way to each neighbour, and cur."""
    logs = torch.log(torch.tensor([lo, cur, hi], dtype=torch.float64))
    a = logs[1] - (logs[1] - logs[0]) * window
    b = logs[1] + (logs[2] - logs[1]) * window
    grid = torch.exp(torch.linspace(float(a), float(b), n + 2, dtype=torch.float64)[1:-1])
    return torch.unique(torch.cat([grid, logs[1:2].exp()])).tolist()


def optimize(denoiser, x0, init, sigma_min, flow=False, candidates=5, sweeps=3, points=2, seed=0):
    """Coordinate descent on the interior sigmas of `init` (descending, ending in 0; its first sigma stays):
    each sigma_i moves to the best of `candidates` log-spaced values between its neighbours (a window that
    halves each sweep), scored by KLUB_{i-1} + KLUB_i; the last interval (to 0) is scored down to sigma_min.
    Stops when a sweep changes nothing, after `sweeps`, or when the budget of `denoiser` (a Counted) runs out
    after the first sweep. Returns (sigmas ending in 0, sweeps done)."""
    klub = KLUB(ve_denoiser(denoiser, flow), x0, points, seed)
    nodes = nodes_to_floor(init, sigma_min)
    if flow:
        nodes[0] = min(float(nodes[0]), 1 - 1e-4)  # sigma~ is infinite at flow's sigma 1
    nodes = [to_ve(float(s), flow) for s in nodes]
    done, window = 0, 1.0
    for _ in range(sweeps):
        changed = False
        try:
            for i in range(1, len(nodes) - 1):
                lo, cur, hi = nodes[i + 1], nodes[i], nodes[i - 1]
                options = _candidates(lo, cur, hi, window, candidates)
                scores = [klub(c, hi) + klub(lo, c) for c in options]
                best = options[min(range(len(options)), key=scores.__getitem__)]
                changed |= abs(best - cur) > 1e-9 * cur
                nodes[i] = best
        except BudgetExceeded:
            if done == 0:
                raise
            break
        done += 1
        window /= 2
        if not changed:
            break
    out = [float(init[0])] + [from_ve(s, flow) for s in nodes[1:-1]] + [0.0]
    return torch.tensor(out, dtype=torch.float32), done
