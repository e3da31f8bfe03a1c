"""Parity of Stride's solvers with reference formulas written out here from the reference code: DPM-Solver++ 3M
against ComfyUI's dpmpp_3m_sde at eta 0, Heavy Ball on DPM-Solver++ 2M against momentum-diffusion's
MomentumDPMSolverMultistepScheduler, and fractional-order GHVB against its GHVBScheduler (Wizadwongsa et al. 2024,
arXiv:2307.11118). Each reference is an independent transcription, in float64, on the exact guided oracle."""
import pytest
import torch

import comfy.k_diffusion.sampling as K
import comfy.model_sampling

from test_samplers_math import m, noise, oracle, rel, unguarded  # noqa: F401 (m, unguarded: fixtures)


@pytest.fixture(autouse=True)
def formulas_alone(unguarded):
    """The references have no divergence guard: Stride's solvers are compared with it off."""


def schedule(flow, n, final_zero=True):
    """n steps, log-spaced (VE) or uniform from 0.98 (flow: below 1, where every lambda is finite)."""
    inner = torch.linspace(0.98, 0.03, n, dtype=torch.float64) if flow else \
        K.get_sigmas_exponential(n - 1, 0.03, 14.6).double()[:-1]
    return torch.cat([inner, torch.zeros(1, dtype=torch.float64)]) if final_zero else inner


class _FlowSampling(comfy.model_sampling.CONST):
    def percent_to_sigma(self, percent):
        return 1.0 - percent


def comfy_model(d, flow):
    """d dressed as the model ComfyUI's samplers read model_sampling from (EPS or CONST)."""
    class Patcher:
        get_model_object = staticmethod(lambda name: _FlowSampling() if flow else comfy.model_sampling.EPS())

    class Inner:
        model_patcher = Patcher()

    class Model:
        inner_model = Inner()

        def __call__(self, x, sigma, **kwargs):
            return d(x, sigma)
    return Model()


def dpmpp_3m_reference(d, x, sigmas, param, quadratic=1.0, warmup="exact"):
    """ComfyUI's sample_dpmpp_3m_sde at eta 0 written out (the official DPM-Solver++ 3M update), with its
    second-derivative term scaled by `quadratic`: 1 is ComfyUI's, whose -phi_3 d2 is half the exact integral of the
    quadratic through the last three outputs; 2 integrates that quadratic exactly (Stride's Taylor terms). Its 2M
    warm-up step integrates the line through the last two outputs exactly ("exact", ComfyUI's) or takes
    DPM-Solver++'s Algorithm 2 midpoint form D0 + (D0 - D1) / 2r ("midpoint", Stride's 2M)."""
    lam = lambda s: param.lam(torch.as_tensor(s, dtype=torch.float64))
    hist = []
    for i in range(len(sigmas) - 1):
        s, t = sigmas[i], sigmas[i + 1]
        den = d(x, s)
        if t == 0:
            return den
        h = lam(t) - lam(s)
        alpha_t = param.alpha(torch.as_tensor(t, dtype=torch.float64))
        x = (t / s) * x - alpha_t * torch.expm1(-h) * den
        phi_2 = torch.expm1(-h) / h + 1
        if len(hist) >= 2:
            (d_1, h_1), (d_2, h_2) = hist[0], hist[1]
            r0, r1 = h_1 / h, h_2 / h
            d1_0, d1_1 = (den - d_1) / r0, (d_1 - d_2) / r1
            d1, d2 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1), (d1_0 - d1_1) / (r0 + r1)
            x = x + alpha_t * phi_2 * d1 - quadratic * alpha_t * (phi_2 / h - 0.5) * d2
        elif hist:
            weight = phi_2 if warmup == "exact" else -0.5 * torch.expm1(-h)
            x = x + alpha_t * weight * (den - hist[0][0]) / (hist[0][1] / h)
        hist = [(den, h)] + hist[:1]
    return x


@pytest.mark.parametrize("flow", [False, True])
@pytest.mark.parametrize("cfg", [1.0, 5.5])
def test_dpmpp_3m_against_comfyui_3m_sde_at_eta_0(m, flow, cfg):
    """At eta 0 ComfyUI's DPM-Solver++(3M) SDE is the 3M ODE solver in the model's half-log-SNR (logit for flow
    models). Its first step agrees with Stride's sample_dpmpp(order=3) to rounding; after it they differ, as
    documented: the 2M warm-up step (ComfyUI: the exact integral of the line, Stride: DPM-Solver++'s midpoint
    form, as its 2M), and the 3M steps (the official update weighs the second-derivative term by half the exact
    integral of the interpolating quadratic; Stride integrates the quadratic exactly). Both forms are checked."""
    sigmas, d = schedule(flow, 8), oracle(m, flow, cfg)
    param = m.core.FLOW if flow else m.core.VE
    x = noise() * sigmas[0] if not flow else noise()
    ours = lambda s: m.multistep.sample_dpmpp(d, x, s, param=param, order=3)
    theirs = lambda s: K.sample_dpmpp_3m_sde(comfy_model(d, flow), x, s, eta=0.0, disable=True)
    assert rel(ours(sigmas[:2]), theirs(sigmas[:2])) < 1e-12  # one step: where both are the same algorithm
    assert rel(dpmpp_3m_reference(d, x, sigmas, param), theirs(sigmas)) < 1e-12  # the transcription is ComfyUI's
    assert rel(ours(sigmas), dpmpp_3m_reference(d, x, sigmas, param, 2.0, "midpoint")) < 1e-12
    assert rel(ours(sigmas), theirs(sigmas)) > 1e-5  # the documented difference is real


def hb_2m_reference(d, x, sigmas, param, beta):
    """momentum-diffusion's MomentumDPMSolverMultistepScheduler (dpmsolver++, midpoint): the first step plain
    first order; each 2M step averages its combined prediction D0 + D1 / 2, v = (1 - beta) v + beta (D0 + D1 / 2),
    v starting at the first 2M step; x_t = (sigma_t / sigma_s) x - alpha_t (e^-h - 1) v; a step to 0 returns D."""
    lam = lambda s: param.lam(torch.as_tensor(s, dtype=torch.float64))
    vel, prev = None, None
    for i in range(len(sigmas) - 1):
        s, t = sigmas[i], sigmas[i + 1]
        m0 = d(x, s)
        if t == 0:
            return m0
        h = lam(t) - lam(s)
        if prev is None:
            update = m0
        else:
            r0 = (lam(s) - lam(prev[1])) / h
            diff = m0 + 0.5 * (m0 - prev[0]) / r0
            vel = diff if vel is None else (1 - beta) * vel + beta * diff
            update = vel
        x = (t / s) * x - param.alpha(torch.as_tensor(t, dtype=torch.float64)) * torch.expm1(-h) * update
        prev = (m0, s)
    return x


@pytest.mark.parametrize("flow", [False, True])
@pytest.mark.parametrize("beta", [0.5, 0.8])
def test_heavy_ball_on_2m_matches_the_reference(m, flow, beta):
    """Momentum on the 2M update only: the first-order warm-up step neither uses nor seeds v."""
    sigmas, d = schedule(flow, 8), oracle(m, flow, 3.0)
    param = m.core.FLOW if flow else m.core.VE
    x = noise() * sigmas[0] if not flow else noise()
    theirs = hb_2m_reference(d, x, sigmas, param, beta)
    assert rel(m.multistep.sample_dpmpp(d, x, sigmas, param=param, order=2, beta=beta), theirs) < 1e-12
    assert rel(m.multistep.sample_dpmpp(d, x, sigmas, param=param, order=2), theirs) > 1e-4  # beta acts


def adams_bashforth_mixer(order, ets, b):
    """momentum-diffusion's AdamBmixer: GHVB's beta-weighted Adams-Bashforth combination, oldest first in ets."""
    k = min(order, len(ets))
    e = ets[::-1]  # newest first
    if k == 1:
        return e[0]
    if k == 2:
        return ((2 + b) * e[0] - (2 - b) * e[1]) / 2 / b
    if k == 3:
        return ((18 + 5 * b) * e[0] - (24 - 8 * b) * e[1] + (6 - b) * e[2]) / 12 / b
    return ((46 + 9 * b) * e[0] - (78 - 19 * b) * e[1] + (42 - 5 * b) * e[2] - (10 - b) * e[3]) / 24 / b


def ghvb_reference(d, x, sigmas, q):
    """momentum-diffusion's GHVBScheduler on a sigma schedule: order ceil(q), beta = frac(q) (1 for integers);
    v = (1 - beta) v + beta g with g = (x - D) / sigma (v starting at g), the AB mix of the last velocities,
    x += (sigma_next - sigma) * mix."""
    order = int(q // 1 + 1) if q % 1 > 0 else int(q)
    beta = q % 1 if q % 1 > 0 else 1.0
    vel, ets = None, []
    for i in range(len(sigmas) - 1):
        g = (x - d(x, sigmas[i])) / sigmas[i]
        vel = g if vel is None else (1 - beta) * vel + beta * g
        ets = (ets + [vel])[-order:]
        x = x + (sigmas[i + 1] - sigmas[i]) * adams_bashforth_mixer(order, ets, beta)
    return x


@pytest.mark.parametrize("flow", [False, True])
@pytest.mark.parametrize("q", [1.5, 2.3, 3.7])
def test_fractional_ghvb_matches_the_reference(m, flow, q):
    """On a schedule ending above 0 (the reference steps to 0 with the velocity mix; Stride takes a final denoise
    there instead, as every Stride sampler does)."""
    sigmas, d = schedule(flow, 8, final_zero=False), oracle(m, flow, 3.0)
    x = noise() * sigmas[0] if not flow else noise()
    theirs = ghvb_reference(d, x, sigmas, q)
    assert rel(m.momentum.sample_ghvb(d, x, sigmas, order=q), theirs) < 1e-12
    assert rel(m.momentum.sample_ghvb(d, x, sigmas, order=float(round(q))), theirs) > 1e-4
