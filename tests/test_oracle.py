"""The exact oracle and the reference solver, on plain tensors (pure math, no sampler involved)."""
import math

import pytest
import torch


@pytest.fixture(scope="module")
def mixture(stride):
    return stride("demo.oracle").GaussianMixture.load()


@pytest.fixture(scope="module")
def reference(stride):
    return stride("samplers.reference")


# (sigma, alpha): EPS states x = x0 + sigma eps, flow states x = (1 - sigma) x0 + sigma eps.
NOISE_LEVELS = [(0.1, 1.0), (2.0, 1.0), (14.6, 1.0), (0.05, 0.95), (0.6, 0.4), (0.97, 0.03)]


@pytest.mark.parametrize("sigma,alpha", NOISE_LEVELS)
def test_denoiser_is_tweedie_of_the_noised_density(mixture, sigma, alpha):
    """E[x0 | x] = (x + sigma^2 grad log p_sigma(x)) / alpha, with the gradient from autograd."""
    gen = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 3, 7, -1, -1, 9])
    x0 = mixture.sample(len(labels), labels, gen)
    x = (alpha * x0 + sigma * torch.randn(x0.shape, generator=gen, dtype=x0.dtype)).requires_grad_(True)
    n = len(labels)
    log_p = mixture.log_prob(x, torch.full((n,), sigma, dtype=x.dtype), torch.full((n,), alpha, dtype=x.dtype), labels)
    grad, = torch.autograd.grad(log_p.sum(), x)
    tweedie = (x + sigma ** 2 * grad) / alpha
    analytic = mixture.denoise(x.detach(), sigma, alpha, labels)
    assert (analytic - tweedie).abs().max() < 1e-6


@pytest.mark.parametrize("sigma,alpha,label", [(3.0, 1.0, 4), (3.0, 1.0, -1), (0.8, 0.2, 2)])
def test_denoiser_matches_monte_carlo(mixture, sigma, alpha, label):
    """Self-normalized importance sampling from the prior: sum_i w_i x0_i / sum_i w_i, w_i = N(x; alpha x0_i, sigma^2)."""
    gen = torch.Generator().manual_seed(2)
    n = 200_000
    prior = mixture.sample(n, torch.full((n,), label), gen)
    x = alpha * prior[:1] + sigma * torch.randn(1, mixture.dim, generator=gen, dtype=prior.dtype)
    log_w = -((x - alpha * prior) ** 2).sum(1) / (2 * sigma ** 2)
    w = torch.softmax(log_w, 0)
    ess = 1.0 / (w ** 2).sum()
    assert ess > 200, f"importance sampling too degenerate (ESS {ess:.0f})"
    mc = (w.unsqueeze(1) * prior).sum(0)
    mc_stderr = ((w.unsqueeze(1) * (prior - mc) ** 2).sum(0) / ess).sqrt()
    analytic = mixture.denoise(x, sigma, alpha, torch.tensor([label]))[0]
    assert ((analytic - mc).abs() <= 5 * mc_stderr + 1e-6).float().mean() > 0.99
    # and it is not the prior mean: the denoiser used x
    assert (analytic - prior.mean(0)).abs().max() > 20 * mc_stderr.max()


def test_guidance_is_the_exact_cfg_combination(mixture):
    x = torch.randn(4, mixture.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([1, 2, 3, 4])
    cond = mixture.denoise(x, 1.5, 1.0, labels)
    uncond = mixture.denoise(x, 1.5, 1.0, torch.full((4,), -1))
    assert torch.allclose(mixture.guided_denoise(x, 1.5, 1.0, labels, 5.5), uncond + 5.5 * (cond - uncond))
    assert torch.equal(mixture.guided_denoise(x, 1.5, 1.0, labels, 1.0), cond)
    assert (cond - uncond).abs().max() > 0.1


def _gaussian_flow(mu, var, alpha_of):
    """A single Gaussian N(mu, diag(var)): its denoiser and its exact PF-ODE solution."""
    def denoiser(x, sigma):
        a = alpha_of(sigma)
        return mu + a * var / (a * a * var + sigma ** 2) * (x - a * mu)

    def exact(x_start, s0, s1):
        a0, a1 = alpha_of(s0), alpha_of(s1)
        spread = ((a1 ** 2 * var + s1 ** 2) / (a0 ** 2 * var + s0 ** 2)).sqrt()
        return a1 * mu + spread * (x_start - a0 * mu)
    return denoiser, exact


@pytest.mark.parametrize("param,s0,s1", [("eps", 14.6, 0.03), ("flow", 0.999, 0.001)])
def test_reference_solver_matches_exact_gaussian_solution(reference, param, s0, s1):
    gen = torch.Generator().manual_seed(4)
    mu = torch.randn(3, 16, generator=gen, dtype=torch.float64)
    var = torch.rand(3, 16, generator=gen, dtype=torch.float64) + 0.01
    alpha_of = (lambda s: 1.0) if param == "eps" else (lambda s: 1.0 - s)
    denoiser, exact = _gaussian_flow(mu, var, alpha_of)
    x_start = alpha_of(s0) * mu + math.sqrt(alpha_of(s0) ** 2 + s0 ** 2) * torch.randn(3, 16, generator=gen, dtype=torch.float64)
    errors = []
    for tol in (1e-4, 1e-6, 1e-8, 1e-10):
        x_end, steps = reference.solve_pf_ode(denoiser, x_start, s0, s1, rtol=tol, atol=tol)
        errors.append((x_end - exact(x_start, s0, s1)).abs().max().item())
    assert errors[-1] < 1e-8
    assert errors[0] > errors[1] > errors[2] > errors[3]


@pytest.mark.parametrize("param", ["eps", "flow"])
def test_reference_solver_converges_on_the_guided_mixture(mixture, reference, param):
    s0, s1, alpha_of = (14.6146, 0.0292, lambda s: 1.0) if param == "eps" else (1.0, 0.001, lambda s: 1.0 - s)
    labels = torch.arange(4)
    x = torch.randn(4, mixture.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * math.sqrt(1 + s0 ** 2 * (param == "eps"))
    denoiser = lambda x_, s: mixture.guided_denoise(x_, s, alpha_of(s), labels, 5.5)
    results = [reference.reference_sample(denoiser, x, s0, s1, rtol=tol, atol=tol) for tol in (1e-5, 1e-7, 1e-9)]
    gap = lambda a, b: (a - b).pow(2).mean().sqrt().item()
    assert gap(results[1], results[2]) < 1e-5
    assert gap(results[0], results[2]) > gap(results[1], results[2])


def test_reference_solver_rejects_bad_interval(reference):
    with pytest.raises(ValueError, match="sigma_start > sigma_end > 0"):
        reference.solve_pf_ode(lambda x, s: x, torch.zeros(1, 2), 0.5, 1.0)
    with pytest.raises(ValueError):
        reference.solve_pf_ode(lambda x, s: x, torch.zeros(1, 2), 1.0, 0.0)
