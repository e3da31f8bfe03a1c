"""The exponential-integrator core every Stride solver is written on.

State convention (ComfyUI's): x = alpha(sigma) x0 + sigma eps with a denoiser D(x, sigma) -> x0_hat.
EPS / V models use the VE form (alpha = 1); flow models (ComfyUI CONST) use alpha = 1 - sigma.
Solvers are written once in (alpha, sigma, lambda = log(alpha / sigma)) and get a `Param` for the model.
Sigmas are per-sample: a solver may carry a [B] vector (Time-Shift moves samples apart); coefficients
are computed in float64 and broadcast over the latent.
"""
import logging
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Param:
    """A parameterization x = alpha(sigma) x0 + sigma eps.

    flow=False: alpha = 1 (VE), lambda = -log sigma. flow=True: alpha = 1 - sigma, lambda = -logit(sigma);
    at sigma = 1, lambda = -inf, so the first sigma is lowered to `sigma_cap` (as ComfyUI's own exponential
    integrators do) before any step that needs lambda.
    """
    flow: bool = False
    sigma_cap: float = 1.0 - 1e-4

    def alpha(self, sigma):
        return 1.0 - sigma if self.flow else torch.ones_like(sigma)

    def lam(self, sigma):
        return -torch.logit(sigma) if self.flow else -torch.log(sigma)

    def sigma_of(self, lam):
        return torch.sigmoid(-lam) if self.flow else torch.exp(-lam)

    def capped(self, sigmas):
        """The schedule with a finite lambda at its start: a first sigma above sigma_cap on a flow model (1, or
        1 less a float32 rounding, whose lambda is about -17) becomes sigma_cap."""
        if self.flow and len(sigmas) > 1 and sigmas[0] > self.sigma_cap:
            sigmas = sigmas.clone()
            sigmas[0] = self.sigma_cap
        return sigmas

    def eps(self, x, denoised, sigma):
        """eps_hat = (x - alpha D) / sigma."""
        return (x - bcast(self.alpha(sigma), x) * denoised) / bcast(sigma, x)


VE = Param(False)
FLOW = Param(True)


def per_sample(sigma, x):
    """sigma as a float64 [B] vector (from a python float, a 0-dim or a [B] tensor)."""
    return torch.as_tensor(sigma, dtype=torch.float64, device=x.device).expand(x.shape[0]).clone()


def bcast(v, x):
    """A [B] (or scalar) coefficient shaped to multiply x, in x's dtype."""
    v = torch.as_tensor(v, device=x.device)
    return v.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def phis(z, n):
    """[phi_1(z), ..., phi_n(z)] with phi_k(z) = int_0^1 e^{(1-s) z} s^{k-1}/(k-1)! ds (float64 tensors).

    phi_1 = expm1(z)/z, phi_{k+1} = (phi_k - 1/k!)/z; for |z| < 0.1 the truncated series is used instead
    (the recursion cancels catastrophically there)."""
    z = torch.as_tensor(z, dtype=torch.float64)
    out, phi = [], torch.expm1(z) / torch.where(z == 0, torch.ones_like(z), z)
    small = z.abs() < 0.1
    for k in range(1, n + 1):
        if k > 1:
            phi = (phi - 1.0 / math.factorial(k - 1)) / torch.where(z == 0, torch.ones_like(z), z)
        series = sum(z ** j / math.factorial(j + k) for j in range(12))
        out.append(torch.where(small, series, phi))
    return out


class History:
    """The multistep buffer: the newest `size` (denoised, lambda) pairs, newest first."""

    def __init__(self, size):
        self.size = size
        self.items = []

    def push(self, denoised, lam):
        self.items = [(denoised, lam)] + self.items[: self.size - 1]

    def __len__(self):
        return len(self.items)

    def ratios(self, h, order):
        """r_k = (lambda_k - lambda_0) / h for k = 1 .. order-1 (float64 [B] each, negative)."""
        lam0 = self.items[0][1]
        return [(self.items[k][1] - lam0) / h for k in range(1, order)]

    def derivatives(self, h, order):
        """Taylor coefficients D^(k)(u) at u = 0 of the polynomial through the newest `order` points, in the
        unit u = (lambda - lambda_0) / h: [D0, D', D'', ...] (Newton divided differences)."""
        us = [torch.zeros_like(h)] + self.ratios(h, order)
        table = [d for d, _ in self.items[:order]]
        coeffs = [table[0]]
        for level in range(1, order):
            table = [(table[j] - table[j + 1]) / bcast(us[j] - us[j + level], table[j]) for j in range(len(table) - 1)]
            coeffs.append(table[0])
        # Newton form p(u) = sum_k c_k prod_{j<k} (u - u_j); derivatives at u = 0 by expanding the products.
        derivs = []
        for k in range(order):
            poly = [torch.ones_like(h)]  # coefficients (low to high) of prod_{j<k} (u - u_j)
            for j in range(k):
                poly = [(poly[i - 1] if i > 0 else 0) - (poly[i] * us[j] if i < len(poly) else 0)
                        for i in range(len(poly) + 1)]
            for m, a in enumerate(poly):
                term = coeffs[k] * bcast(a * math.factorial(m), coeffs[k])
                if m < len(derivs):
                    derivs[m] = derivs[m] + term
                else:
                    derivs.append(term)
        return derivs[:order]


# A higher-order update (or corrector) that moves x away from the first-order step by more than GUARD times the
# state's own size is unstable (stiff guidance, steps too large for the extrapolation): that step keeps order 1.
GUARD = 0.2


def guarded(x_high, x_first):
    """Per sample, x_high unless ||x_high - x_first|| > GUARD ||x_first||, then x_first (order 1); and how many
    samples fell back."""
    norm = lambda v: torch.linalg.vector_norm(v.flatten(1).float(), dim=1)
    far = norm(x_high - x_first) > GUARD * norm(x_first)
    return torch.where(bcast(far, x_high).bool(), x_first, x_high), int(far.sum())


def log_lowered(name, count):
    """Say how many steps (summed over the samples) the guard kept at first order; nothing when none."""
    if count:
        logging.info("Stride %s: %d step(s) of a sample kept the first-order step: the higher-order one overshot it "
                     "(stiff guidance or steps too large for it)", name, count)


def exp_step(param, x, sigma, sigma_next, derivs):
    """Data-prediction exponential-integrator step with Taylor terms (DPM-Solver++, Lu et al. 2022, 2211.01095):
    x_t = (sigma_t/sigma_s) x_s + alpha_t sum_k h phi_{k+1}(-h) D^(k)(u), u = (lambda - lambda_s)/h.
    sigma_next = 0 returns the zeroth term's limit, D0."""
    if bool((sigma_next == 0).all()):
        return derivs[0]
    h = param.lam(sigma_next) - param.lam(sigma)
    out = bcast(sigma_next / sigma, x) * x
    alpha_t = param.alpha(sigma_next)
    for k, phi in enumerate(phis(-h, len(derivs))):
        out = out + bcast(alpha_t * h * phi, x) * derivs[k]
    return out


def ode_slope(x, denoised, sigma):
    """d = (x - D) / sigma, the PF-ODE slope dx/dsigma in either parameterization (the flow velocity for flow)."""
    return (x - denoised) / bcast(sigma, x)


def check_sigmas(sigmas, name):
    """Reject schedules no solver can follow: empty, NaN/inf, negative, or not strictly decreasing."""
    sigmas = torch.as_tensor(sigmas)
    if sigmas.ndim != 1 or len(sigmas) == 0:
        raise ValueError(f"Stride {name}: sigmas must be a non-empty 1-D list, got shape {tuple(sigmas.shape)}")
    if not bool(torch.isfinite(sigmas).all()) or bool((sigmas < 0).any()):
        raise ValueError(f"Stride {name}: sigmas must be finite and >= 0, got {sigmas.tolist()}")
    if len(sigmas) > 1 and not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError(f"Stride {name}: sigmas must decrease strictly, got {sigmas.tolist()}")
