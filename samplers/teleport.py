"""Analytical teleportation (Wang & Vastola 2024, arXiv:2303.02490): where the data distribution is seen at high
noise, it is well approximated by a Gaussian N(mu, U diag(lam) U^T + lam_res (I - U U^T)), whose PF-ODE is solved
in closed form, so the first part of the schedule costs no model evaluation:
    x~_sigma = mu + U diag(a(lam)) U^T (x~_T - mu) + a(lam_res) (r),  a(l) = sqrt((sigma~^2 + l) / (sigma~_T^2 + l)),
r the part of x~_T - mu outside span(U), in VE-ised variables (x~ = x / alpha, sigma~ = sigma / alpha).
The statistics come from samples of the user's model (no training data): mean, rank-r PCA, isotropic residual.
"""
import torch

from .core import VE, check_sigmas
from .multistep import sample_dpmpp


def gaussian_stats(samples, rank):
    """(mu [D], U [D, r], lam [r], lam_res) of samples [K, ...]: mean, the top-r principal directions and variances,
    and the mean variance left in the other D - r directions."""
    flat = samples.double().flatten(1)
    k, d = flat.shape
    if k < 2:
        raise ValueError("Stride teleportation: the statistics need at least 2 samples")
    mu = flat.mean(0)
    centred = flat - mu
    rank = min(rank, k - 1, d)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    lam = s[:rank] ** 2 / (k - 1)
    total = centred.pow(2).sum() / (k - 1)
    lam_res = ((total - lam.sum()) / max(d - rank, 1)).clamp_min(0.0)
    return mu, vh[:rank].T.contiguous(), lam, lam_res


def teleport(x, sigma_from, sigma_to, stats, param=VE):
    """The Gaussian PF-ODE solution from sigma_from to sigma_to (model coordinates, batch x [B, ...])."""
    mu, u, lam, lam_res = (t.to(torch.float64) for t in stats)
    s_from, s_to = (param.capped(torch.tensor([float(s), 0.0], dtype=torch.float64))[0] for s in (sigma_from, sigma_to))
    a_from, a_to = param.alpha(s_from), param.alpha(s_to)
    vs_from, vs_to = s_from / a_from, s_to / a_to  # VE-ised sigmas
    xt = x.double().flatten(1) / a_from - mu
    coef = torch.sqrt((vs_to ** 2 + lam) / (vs_from ** 2 + lam))
    coef_res = torch.sqrt((vs_to ** 2 + lam_res) / (vs_from ** 2 + lam_res))
    proj = xt @ u
    out = mu + (proj * coef) @ u.T + coef_res * (xt - proj @ u.T)
    return (out * a_to).reshape(x.shape).to(x.dtype)


def skip_index(sigmas, skip):
    """The schedule index the jump lands on: round(skip * steps), at least 0 and leaving at least one step."""
    steps = len(sigmas) - 1
    if not 0.0 <= skip < 1.0:
        raise ValueError(f"Stride teleportation: skip must be in [0, 1), got {skip}")
    return min(round(skip * steps), steps - 1)


def sample_teleport(model, x, sigmas, extra_args=None, callback=None, disable=None, param=VE, stats=None, skip=0.2,
                    solver=sample_dpmpp, **solver_options):
    """Teleport over the first round(skip * steps) steps of the schedule at no model cost, then run `solver`
    (default DPM-Solver++ 2M) on the rest."""
    if stats is None:
        raise ValueError("Stride teleportation: no Gaussian statistics; calibrate the model first")
    check_sigmas(sigmas, "teleportation")
    if int(stats[0].numel()) != x[0].numel():
        raise ValueError(f"Stride teleportation: the statistics are for latents of {int(stats[0].numel())} values, "
                         f"this one has {x[0].numel()}; calibrate at this latent size")
    k = skip_index(sigmas, skip)
    if k > 0:
        x = teleport(x, sigmas[0], sigmas[k], stats, param)
    return solver(model, x, sigmas[k:], extra_args, callback, disable, param=param, **solver_options)
