"""x_ref for a sampling run on the oracle: the same start state as ComfyUI's KSAMPLER, the guided PF-ODE
solved to the model's sigma_min with the reference solver, then denoised (one endpoint for every schedule)."""
import math

import torch

from . import host


def alpha_of(model_sampling):
    """alpha(sigma) of the model's parameterization, read off its own noise_scaling (1, or 1 - sigma)."""
    one, zero = torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)
    return lambda sigma: model_sampling.noise_scaling(torch.tensor([sigma], dtype=torch.float64), zero, one).item()


def start_state(model_sampling, sigma_start, noise):
    """The state KSAMPLER hands the sampler: noise_scaling with max_denoise when starting at sigma_max."""
    sigma_max = float(model_sampling.sigma_max)
    max_denoise = math.isclose(sigma_max, sigma_start, rel_tol=1e-5) or sigma_start > sigma_max
    sigma = torch.tensor([sigma_start], dtype=torch.float64)
    return model_sampling.noise_scaling(sigma, noise.to(torch.float64), torch.zeros_like(noise, dtype=torch.float64),
                                        max_denoise)


def oracle_reference(mixture, model_sampling, sigma_start, noise, labels, cfg, rtol=1e-8):
    """x_ref [B, 4, 8, 8] (float64) for noise [B, 4, 8, 8], digit labels [B] and guidance scale cfg."""
    solver = host.stride("samplers.reference")
    alpha = alpha_of(model_sampling)
    labels = torch.as_tensor(labels)
    denoiser = lambda x, sigma: mixture.guided_denoise(x, sigma, alpha(sigma), labels, cfg)
    x = start_state(model_sampling, float(sigma_start), noise).flatten(1)
    ref = solver.reference_sample(denoiser, x, float(sigma_start), float(model_sampling.sigma_min), rtol, rtol)
    return ref.view(noise.shape)


def error_vs_reference(x, x_ref, data_std):
    """Per-image RMSE over the latent, in units of the data standard deviation."""
    return (x.double() - x_ref).flatten(1).pow(2).mean(1).sqrt() / data_std
