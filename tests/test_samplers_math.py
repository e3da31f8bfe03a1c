"""Stride's solvers on plain denoisers: parity with ComfyUI's own implementations, convergence orders on the
exact oracle, EPS/flow equivalence, exactness on a constant denoiser, the plug-ins' math, and bad options."""
import math

import pytest
import torch

import comfy.k_diffusion.sampling as K
from comfy.extra_samplers import uni_pc

LABELS = torch.tensor([0, 3, 7, 9])


@pytest.fixture(scope="module")
def m(stride):
    class Modules:
        core = stride("samplers.core")
        multistep = stride("samplers.multistep")
        plugins = stride("samplers.plugins")
        momentum = stride("samplers.momentum")
        flow = stride("samplers.flow")
        reference = stride("samplers.reference")
        mixture = stride("nodes.oracle_model").load_mixture()
    return Modules


def oracle(m, flow, cfg):
    """The exact guided oracle as a k-diffusion denoiser (float64) in the VE or flow parameterization."""
    def denoise(x, sigma, **_):
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return m.mixture.guided_denoise(x, sigma, 1 - sigma if flow else torch.ones_like(sigma), LABELS, cfg)
    return denoise


def noise(seed=0):
    return torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def schedule(flow, n):
    """n steps uniform in lambda, ending with a final denoise (for flow: from sigma 1, as ComfyUI's simple)."""
    if flow:
        return torch.cat([torch.linspace(1, 0.02, n, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    return torch.cat([K.get_sigmas_exponential(n - 1, 0.03, 14.6).double()[:-1], torch.zeros(1, dtype=torch.float64)])


def start(sigmas, flow):
    return noise() * sigmas[0] if not flow or sigmas[0] < 1 else noise()


# --- parity with ComfyUI -------------------------------------------------------------------------------------
# The algorithms themselves: the divergence guard (core.GUARD, tests/test_stability.py) is off here, as ComfyUI's
# samplers have none and part of these settings is stiff enough to trigger it.

@pytest.fixture
def unguarded(m, monkeypatch):
    monkeypatch.setattr(m.core, "GUARD", float("inf"))


@pytest.mark.parametrize("flow", [False, True])
@pytest.mark.parametrize("cfg", [1.0, 5.5])
def test_dpmpp_2m_matches_comfyui(m, unguarded, flow, cfg):
    """ComfyUI's dpmpp_2m steps in -log(sigma) on every model; Stride's core with the VE lambda is the same
    algorithm (on flow models too), and must agree to rounding."""
    sigmas, d = schedule(flow, 8), oracle(m, flow, cfg)
    x = start(sigmas, flow)
    ours = m.multistep.sample_dpmpp(d, x, sigmas, param=m.core.VE, order=2)
    assert rel(ours, K.sample_dpmpp_2m(d, x, sigmas, disable=True)) < 1e-10


@pytest.mark.parametrize("flow", [False, True])
@pytest.mark.parametrize("cfg", [1.0, 5.5])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_unipc_matches_comfyui(m, unguarded, flow, cfg, variant):
    """ComfyUI's uni_pc integrates to sigma = 0.001 instead of a final denoise (VP form, lambda = -log sigma):
    Stride's UniPC (order 3, lower order final) on the same sigmas ending at 0.001 is the same algorithm.
    ComfyUI's implementation builds float32 constants, so it runs here with float64 as the default dtype."""
    sigmas, d = schedule(flow, 8), oracle(m, flow, cfg)
    x = start(sigmas, flow)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        theirs = uni_pc.sample_unipc(d, x, sigmas, extra_args={}, disable=True, variant=variant)
    finally:
        torch.set_default_dtype(previous)
    to_floor = sigmas.clone()
    to_floor[-1] = 0.001
    ours = m.multistep.sample_unipc(d, x, to_floor, param=m.core.VE, order=3, variant=variant)
    assert rel(ours, theirs) < 1e-10


@pytest.mark.parametrize("flow", [False, True])
def test_plms_and_ghvb_at_order_4_without_momentum_match_comfyui_ipndm(m, flow):
    sigmas, d = schedule(flow, 8), oracle(m, flow, 3.0)
    x = start(sigmas, flow)
    theirs = K.sample_ipndm(d, x, sigmas, disable=True)
    assert rel(m.momentum.sample_plms_hb(d, x, sigmas, order=4, beta=1.0), theirs) < 1e-12
    assert rel(m.momentum.sample_ghvb(d, x, sigmas, order=4.0), theirs) < 1e-12


@pytest.mark.parametrize("flow", [False, True])
def test_flowturbo_with_only_heun_steps_is_comfyui_heun(m, unguarded, flow):
    sigmas, d = schedule(flow, 6), oracle(m, flow, 3.0)
    x = start(sigmas, flow)
    ours = m.flow.sample_flowturbo(d, x, sigmas, heun_steps=len(sigmas))
    assert rel(ours, K.sample_heun(d, x, sigmas, disable=True)) < 1e-12


@pytest.mark.parametrize("flow", [False, True])
def test_mixed_sde_without_noise_is_comfyui_euler(m, flow):
    sigmas, d = schedule(flow, 6), oracle(m, flow, 3.0)
    x = start(sigmas, flow)
    ours = m.flow.sample_mixed_sde(d, x, sigmas, eta=0.0, noise_sampler=lambda s, t: torch.randn_like(x))
    assert rel(ours, K.sample_euler(d, x, sigmas, disable=True)) < 1e-12


# --- convergence orders ----------------------------------------------------------------------------------------

def ode_range(flow):
    """(sigma_start, sigma_end): a stretch of the guided ODE that is smooth enough to show asymptotic orders."""
    return (10 / 11, 1 / 3) if flow else (10.0, 0.5)


def lam_grid(m, param, n, flow):
    s0, s1 = ode_range(flow)
    lam = torch.linspace(param.lam(torch.tensor(s0, dtype=torch.float64)).item(),
                         param.lam(torch.tensor(s1, dtype=torch.float64)).item(), n + 1, dtype=torch.float64)
    return param.sigma_of(lam)


SOLVERS = {  # name -> (run, expected global order)
    "ddim": (lambda m, d, x, s, p: m.multistep.sample_ddim(d, x, s, param=p), 1),
    "dpmpp_2m": (lambda m, d, x, s, p: m.multistep.sample_dpmpp(d, x, s, param=p, order=2), 2),
    "unipc_1": (lambda m, d, x, s, p: m.multistep.sample_unipc(d, x, s, param=p, order=1, lower_order_final=False), 2),
    "unipc_2": (lambda m, d, x, s, p: m.multistep.sample_unipc(d, x, s, param=p, order=2, lower_order_final=False), 3),
    "unipc_2_bh2": (lambda m, d, x, s, p: m.multistep.sample_unipc(d, x, s, param=p, order=2, variant="bh2",
                                                                    lower_order_final=False), 3),
    "unip_2": (lambda m, d, x, s, p: m.multistep.sample_unipc(d, x, s, param=p, order=2, corrector=False,
                                                               lower_order_final=False), 2),
}


@pytest.mark.parametrize("flow", [False, True])
@pytest.mark.parametrize("name", list(SOLVERS))
def test_global_convergence_order(m, flow, name):
    """Error at sigma_end against the adaptive float64 reference falls as NFE^-p (slope over 16 -> 64 steps)."""
    run, order = SOLVERS[name]
    param = m.core.FLOW if flow else m.core.VE
    d = oracle(m, flow, 1.0)
    s0, s1 = ode_range(flow)
    x = noise() * s0
    exact, _ = m.reference.solve_pf_ode(lambda x_, s: d(x_, s), x, s0, s1, 1e-12, 1e-12)
    errors = [rel(run(m, d, x, lam_grid(m, param, n, flow), param), exact) for n in (16, 64)]
    slope = math.log(errors[0] / errors[1]) / math.log(4)
    assert order - 0.35 < slope < order + 0.6, (errors, slope)


SIGMA_SPACE = {  # name -> (run, (lowest, highest) expected global order on equal sigma steps)
    "plms_2": (lambda m, d, x, s: m.momentum.sample_plms_hb(d, x, s, order=2, beta=1.0), (2, 2)),
    "plms_3": (lambda m, d, x, s: m.momentum.sample_plms_hb(d, x, s, order=3, beta=1.0), (2, 3)),
    "plms_2_heavy_ball": (lambda m, d, x, s: m.momentum.sample_plms_hb(d, x, s, order=2, beta=0.8), (1, 1)),
    "ghvb_1.5": (lambda m, d, x, s: m.momentum.sample_ghvb(d, x, s, order=1.5), (2, 2)),
    "ghvb_2.5": (lambda m, d, x, s: m.momentum.sample_ghvb(d, x, s, order=2.5), (2, 3)),
    "flowturbo": (lambda m, d, x, s: m.flow.sample_flowturbo(d, x, s, heun_steps=1), (2, 2)),
}


@pytest.mark.parametrize("flow", [False, True])
@pytest.mark.parametrize("name", list(SIGMA_SPACE))
def test_sigma_space_convergence_order(m, flow, name):
    """Adams-Bashforth weights assume equal steps, so the sigma-space methods are measured on equal steps in
    sigma: PLMS-k and GHVB of order q converge as ceil(q), Heavy Ball with beta < 1 as 1, FlowTurbo as 2. Third
    order shows before the first-order warm-up step caps it at 2 asymptotically (as for DPM-Solver++(3M))."""
    run, (low, high) = SIGMA_SPACE[name]
    d = oracle(m, flow, 1.0)
    s0, s1 = (10 / 11, 2 / 3) if flow else (10.0, 2.0)
    x = noise() * s0
    exact, _ = m.reference.solve_pf_ode(lambda x_, s: d(x_, s), x, s0, s1, 1e-12, 1e-12)
    errors = [rel(run(m, d, x, torch.linspace(s0, s1, n + 1, dtype=torch.float64)), exact) for n in (32, 128)]
    slope = math.log(errors[0] / errors[1]) / math.log(4)
    assert low - 0.4 < slope < high + 0.6, (errors, slope)


@pytest.mark.parametrize("flow", [False, True])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_local_error_order_of_the_dpmpp_step(m, flow, order):
    """One DPM-Solver++ step of order p from exact history points has local error O(h^(p+1)). (Globally 3M is
    limited to order 2 by its lower-order warm-up steps, so its order shows in the local error.)"""
    param = m.core.FLOW if flow else m.core.VE
    d = oracle(m, flow, 1.0)
    s0, _ = ode_range(flow)
    lam0 = param.lam(torch.tensor(s0, dtype=torch.float64)) + 1.0
    x_start = noise() * s0
    exact = lambda lam: m.reference.solve_pf_ode(d, x_start, s0, param.sigma_of(lam).item(), 1e-12, 1e-12)[0]
    errors = []
    for h in (0.2, 0.1):
        hist = m.core.History(order)
        for k in reversed(range(order)):
            sigma = param.sigma_of(lam0 - k * h)
            hist.push(d(exact(lam0 - k * h), sigma), param.lam(sigma).expand(4))
        s, t = param.sigma_of(lam0).expand(4), param.sigma_of(lam0 + h).expand(4)
        x_next = m.multistep.dpmpp_update(param, exact(lam0), s, t, hist, order, hist.items[0][0])
        errors.append(rel(x_next, exact(lam0 + h)))
    slope = math.log2(errors[0] / errors[1])
    assert order + 1 - 0.4 < slope < order + 1 + 0.6, (errors, slope)


# --- parameterization -------------------------------------------------------------------------------------------

EXP_SOLVERS = {
    "dpmpp_3m": dict(fn="sample_dpmpp", order=3),
    "unipc_bh2": dict(fn="sample_unipc", order=3, variant="bh2"),
    "dpmpp_2m_dualfast": dict(fn="sample_dpmpp", order=2, dualfast=0.5),
    "unipc_dualfast_first": dict(fn="sample_unipc", order=2, dualfast=0.7, dualfast_ref="first"),
}


@pytest.mark.parametrize("name", list(EXP_SOLVERS))
def test_eps_and_flow_parameterizations_give_the_same_sample(m, name):
    """The exponential integrators depend on lambda only: on the flow oracle with the flow Param, and on the
    EPS oracle at sigma/(1 - sigma) with the VE Param, they walk the same trajectory (x_flow = (1 - sigma) x_ve).
    (Time-Shift is not in this list: it relabels the state's sigma while keeping the state in the model's own
    parameterization, which is a different operation in the two views.)"""
    options = dict(EXP_SOLVERS[name])
    fn = getattr(m.multistep, options.pop("fn"))
    flow_sigmas = torch.cat([torch.linspace(0.995, 0.05, 7, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    ve_sigmas = flow_sigmas / (1 - flow_sigmas)
    eps = noise()
    x_flow = fn(oracle(m, True, 3.0), eps * flow_sigmas[0], flow_sigmas, param=m.core.FLOW, **options)
    x_ve = fn(oracle(m, False, 3.0), eps * ve_sigmas[0], ve_sigmas, param=m.core.VE, **options)
    assert rel(x_flow, x_ve) < 1e-9


def test_flow_schedule_starting_at_one_takes_comfyui_first_sigma_offset(m):
    param = m.core.Param(True, 0.9995)
    assert m.core.FLOW.capped(torch.tensor([1.0, 0.5, 0.0]))[0].item() == pytest.approx(1 - 1e-4)
    assert param.capped(torch.tensor([1.0, 0.5, 0.0]))[0].item() == pytest.approx(0.9995)
    assert m.core.VE.capped(torch.tensor([1.0, 0.5, 0.0]))[0].item() == 1.0


def test_phi_functions_match_their_integrals(m):
    z = torch.tensor([-3.0, -0.5, -0.05, -1e-4, 0.0, 0.07], dtype=torch.float64)
    s = torch.linspace(0, 1, 20001, dtype=torch.float64)[:, None]
    for k, phi in enumerate(m.core.phis(z, 3), start=1):
        integrand = torch.exp((1 - s) * z) * s ** (k - 1) / math.factorial(k - 1)
        assert torch.allclose(phi, torch.trapezoid(integrand, s, dim=0), rtol=1e-7)


# --- exactness and plug-ins ---------------------------------------------------------------------------------------

DETERMINISTIC = {
    "ddim": lambda m, d, x, s, p: m.multistep.sample_ddim(d, x, s, param=p),
    "dpmpp_3m": lambda m, d, x, s, p: m.multistep.sample_dpmpp(d, x, s, param=p, order=3),
    "dpmpp_2m_hb": lambda m, d, x, s, p: m.multistep.sample_dpmpp(d, x, s, param=p, order=2, beta=0.7),
    "unipc_bh1": lambda m, d, x, s, p: m.multistep.sample_unipc(d, x, s, param=p, order=3),
    "unipc_dualfast": lambda m, d, x, s, p: m.multistep.sample_unipc(d, x, s, param=p, variant="bh2", dualfast=1.0),
    "plms_hb": lambda m, d, x, s, p: m.momentum.sample_plms_hb(d, x, s, order=3, beta=0.6),
    "ghvb": lambda m, d, x, s, p: m.momentum.sample_ghvb(d, x, s, order=2.3),
    "flowturbo": lambda m, d, x, s, p: m.flow.sample_flowturbo(d, x, s, heun_steps=1),
}


@pytest.mark.parametrize("flow", [False, True])
@pytest.mark.parametrize("name", list(DETERMINISTIC))
def test_constant_denoiser_is_integrated_exactly(m, flow, name):
    """With D(x, sigma) = x0 fixed, the ODE solution is alpha x0 + sigma eps; every solver (with momentum or
    DualFast too: nothing changes along the path) must land on it exactly at the end of the schedule."""
    param = m.core.FLOW if flow else m.core.VE
    x0, eps = noise(1), noise(2)
    sigmas = torch.tensor([0.9, 0.7, 0.5, 0.35, 0.2, 0.1] if flow else [9.0, 5.0, 2.5, 1.0, 0.4, 0.1],
                          dtype=torch.float64)
    x = param.alpha(sigmas[0]) * x0 + sigmas[0] * eps
    out = DETERMINISTIC[name](m, lambda x_, s_, **_: x0, x, sigmas, param)
    assert rel(out, param.alpha(sigmas[-1]) * x0 + sigmas[-1] * eps) < 1e-10


def test_dualfast_extrapolates_the_noise_prediction(m):
    """D~ = (1 + c) D - c (x - sigma eps_tau) / alpha with c = strength * i / (N - 1) and tau the previous step."""
    plugin = m.plugins.DualFast(0.6)
    sigmas = torch.tensor([0.9, 0.6, 0.3, 0.0], dtype=torch.float64)
    plugin.reset(m.core.FLOW, sigmas)
    x0, x1, d0, d1 = noise(1), noise(2), noise(3), noise(4)
    s0, s1 = torch.full([4], 0.9, dtype=torch.float64), torch.full([4], 0.6, dtype=torch.float64)
    assert torch.equal(plugin.first_order(0, x0, s0, s1, d0), d0)       # c = 0 at the first step
    eps_tau = (x0 - 0.1 * d0) / 0.9
    c = 0.6 * 1 / 2
    expected = (1 + c) * d1 - c * (x1 - 0.6 * eps_tau) / 0.4
    assert rel(plugin.first_order(1, x1, s1, s1, d1), expected) < 1e-12


def test_time_shift_finds_the_noise_level_that_matches_the_variance(m):
    param = m.core.FLOW
    sigmas = torch.tensor([0.95, 0.8, 0.6, 0.4, 0.2, 0.0], dtype=torch.float64)
    plugin = m.plugins.TimeShift(window=1.0, cutoff=1.0)
    plugin.reset(param, sigmas)
    x0 = m.mixture.sample(4, LABELS, torch.Generator().manual_seed(0)).view(4, 4, 8, 8).double()
    true_sigma = 0.65                                  # the state is noisier than its nominal 0.6
    flat0 = x0.flatten(1) - x0.flatten(1).mean(1, keepdim=True)
    eps = noise(5).flatten(1)
    eps = eps - eps.mean(1, keepdim=True)
    eps = eps - (eps * flat0).sum(1, keepdim=True) / (flat0 * flat0).sum(1, keepdim=True) * flat0
    eps = (eps / eps.var(1, keepdim=True).sqrt()).view_as(x0)  # unit variance, uncorrelated with x0
    x = (1 - true_sigma) * x0 + true_sigma * eps
    _, shifted = plugin.after_step(1, x, torch.full([4], 0.6, dtype=torch.float64), x0)
    assert torch.allclose(shifted, torch.full([4], true_sigma, dtype=torch.float64), atol=0.01)
    narrow = m.plugins.TimeShift(window=0.1, cutoff=1.0)
    narrow.reset(param, sigmas)
    _, clipped = narrow.after_step(1, x, torch.full([4], 0.6, dtype=torch.float64), x0)
    lam = param.lam
    edge = param.sigma_of(lam(torch.tensor(0.6, dtype=torch.float64)) - 0.05 * (lam(torch.tensor(0.6)) -
                                                                                 lam(torch.tensor(0.8))))
    assert torch.allclose(clipped, edge.expand(4).double(), atol=1e-6)   # the window's noisy edge
    _, untouched = plugin.after_step(0, x, torch.full([4], 0.6, dtype=torch.float64), x0)
    assert torch.equal(untouched, torch.full([4], 0.6, dtype=torch.float64))   # never after the first step


def test_ghvb_integer_orders_are_plms_and_order_one_is_euler(m):
    sigmas, d = schedule(False, 6), oracle(m, False, 2.0)
    x = start(sigmas, False)
    for q in (2.0, 3.0):
        assert rel(m.momentum.sample_ghvb(d, x, sigmas, order=q),
                   m.momentum.sample_plms_hb(d, x, sigmas, order=int(q), beta=1.0)) < 1e-12
    assert rel(m.momentum.sample_ghvb(d, x, sigmas, order=1.0), K.sample_euler(d, x, sigmas, disable=True)) < 1e-12


@pytest.mark.parametrize("flow", [False, True])
def test_mixed_sde_keeps_the_marginals(m, flow):
    """On 1-D Gaussian data N(0, 0.5^2) the SDE steps (eta 1, whole schedule) must end at the data's variance:
    a wrong drift or noise scale shows up as a wrong spread."""
    std = 0.5
    param = m.core.FLOW if flow else m.core.VE

    def d(x, sigma, **_):
        sigma = torch.as_tensor(sigma, dtype=torch.float64).view(-1, 1)
        a = param.alpha(sigma)
        return a * std ** 2 * x / (a ** 2 * std ** 2 + sigma ** 2)
    sigmas = torch.cat([torch.logspace(math.log10(0.999 if flow else 20.0), math.log10(0.002), 300,
                                       dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    gen = torch.Generator().manual_seed(0)
    x0 = std * torch.randn(20000, 1, generator=gen, dtype=torch.float64)
    x = param.alpha(sigmas[0]) * x0 + sigmas[0] * torch.randn(20000, 1, generator=gen, dtype=torch.float64)
    out = m.flow.sample_mixed_sde(d, x, sigmas, param=param, eta=1.0, window=(0.0, 1.0),
                                  noise_sampler=lambda s, t: torch.randn(x.shape, generator=gen, dtype=torch.float64))
    assert out.std().item() == pytest.approx(std, rel=0.03)
    assert out.mean().item() == pytest.approx(0.0, abs=0.02)


def test_mixed_sde_is_deterministic_for_a_seeded_noise_sampler(m):
    sigmas, d = schedule(True, 6), oracle(m, True, 2.0)
    runs = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(7)
        runs.append(m.flow.sample_mixed_sde(d, noise(), sigmas, param=m.core.FLOW, eta=0.7, window=(0.0, 0.5),
                                            noise_sampler=lambda s, t: torch.randn(4, 4, 8, 8, generator=gen,
                                                                                   dtype=torch.float64)))
    assert torch.equal(runs[0], runs[1])
    assert rel(runs[0], K.sample_euler(d, noise(), sigmas, disable=True)) > 1e-3  # the noise did something


# --- bad options ----------------------------------------------------------------------------------------------------

BAD = [
    (lambda m, d, x, s: m.multistep.sample_dpmpp(d, x, s, order=4), "orders"),
    (lambda m, d, x, s: m.multistep.sample_unipc(d, x, s, variant="bh3"), "variant"),
    (lambda m, d, x, s: m.multistep.sample_dpmpp(d, x, s, order=3, beta=0.8), "momentum"),
    (lambda m, d, x, s: m.multistep.sample_dpmpp(d, x, s, time_shift={"window": 0.0}), "window"),
    (lambda m, d, x, s: m.multistep.sample_dpmpp(d, x, s, time_shift={"window": 0.3, "cutoff": 1.5}), "cutoff"),
    (lambda m, d, x, s: m.multistep.sample_ddim(d, x, s, dualfast=0.5, dualfast_ref="last"), "reference step"),
    (lambda m, d, x, s: m.momentum.sample_ghvb(d, x, s, order=5.0), "order"),
    (lambda m, d, x, s: m.momentum.sample_plms_hb(d, x, s, order=5), "order"),
    (lambda m, d, x, s: m.flow.sample_mixed_sde(d, x, s, window=(0.6, 0.2), noise_sampler=lambda a, b: 0), "window"),
    (lambda m, d, x, s: m.flow.sample_flowturbo(d, x, s, heun_steps=-1), "heun_steps"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_options_are_clear_errors(m, case):
    run, words = BAD[case]
    with pytest.raises(ValueError, match=words):
        run(m, oracle(m, False, 1.0), noise(), schedule(False, 4))


@pytest.mark.parametrize("sigmas", [[], [1.0, 2.0, 0.0], [3.0, float("nan"), 0.0], [2.0, 2.0, 0.0], [[1.0]]])
def test_bad_schedules_are_clear_errors(m, sigmas):
    with pytest.raises(ValueError, match="Stride x: sigmas"):
        m.core.check_sigmas(torch.tensor(sigmas), "x")


@pytest.mark.parametrize("cfg", [1.0, 5.5])
def test_unipc_bh1_from_pure_noise_on_flow_skips_the_first_corrector(m, unguarded, cfg):
    """From sigma = 1 the capped first flow step is about 7 in lambda, where bh1's corrector weight h/2 is far
    outside UniPC's small-step regime; skipping that one corrector (what a schedule from 1 does) beats keeping it
    (the same schedule given from the capped sigma, which keeps every corrector)."""
    d = oracle(m, True, cfg)
    sigmas = torch.cat([torch.linspace(1, 0.05, 10, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    x = noise()
    exact = m.reference.sample_reference(lambda x_, s, **_: d(x_, s), x, torch.tensor([0.9999, 0.05, 0.0]),
                                         rtol=1e-9, atol=1e-9)
    skipped = m.multistep.sample_unipc(d, x, sigmas, param=m.core.FLOW, variant="bh1")
    kept = m.multistep.sample_unipc(d, x, m.core.FLOW.capped(sigmas), param=m.core.FLOW, variant="bh1")
    assert rel(skipped, exact) < 0.7 * rel(kept, exact), (rel(skipped, exact), rel(kept, exact))


PROGRESS = {
    "dpmpp_2m": lambda m, d, x, s, cb: m.multistep.sample_dpmpp(d, x, s, callback=cb),
    "unipc": lambda m, d, x, s, cb: m.multistep.sample_unipc(d, x, s, callback=cb),
    "plms_hb": lambda m, d, x, s, cb: m.momentum.sample_plms_hb(d, x, s, callback=cb),
    "ghvb": lambda m, d, x, s, cb: m.momentum.sample_ghvb(d, x, s, callback=cb),
    "flowturbo": lambda m, d, x, s, cb: m.flow.sample_flowturbo(d, x, s, callback=cb, heun_steps=1),
    "mixed_sde": lambda m, d, x, s, cb: m.flow.sample_mixed_sde(d, x, s, callback=cb,
                                                                noise_sampler=lambda a, b: torch.randn_like(x)),
}


@pytest.mark.parametrize("name", list(PROGRESS))
def test_every_step_reports_progress(m, name):
    """ComfyUI's progress bar and previews advance through the callback: one call per step, in order (FlowTurbo's
    pseudo-corrector steps, which evaluate no model at their start, too)."""
    steps, sigmas = [], schedule(False, 6)
    PROGRESS[name](m, oracle(m, False, 2.0), start(sigmas, False), sigmas, lambda info: steps.append(info["i"]))
    assert steps == list(range(len(sigmas) - 1))
