"""Bottleneck Sampling on plain denoisers: one stage is DDIM exactly and stage 0 follows the user's sigmas (exact
oracle); re-noising uses the model's interpolant (the Gaussian prior's law survives stage changes, VE and flow);
the low stage runs at low resolution and carries a smooth image; anti-aliased resizing; errors; determinism."""
import pytest
import torch

from comfy.k_diffusion.sampling import default_noise_sampler

LABELS = torch.tensor([0, 3, 7, 9])
F64 = torch.float64


@pytest.fixture(scope="module")
def m(stride, guided_oracle):
    class Modules:
        guided = staticmethod(guided_oracle)
        core = stride("samplers.core")
        multistep = stride("samplers.multistep")
        bn = stride("samplers.bottleneck")
    return Modules


def param(m, flow):
    return m.core.FLOW if flow else m.core.VE


def oracle(m, flow, cfg=3.0):
    return m.guided(flow, LABELS, cfg)


def gaussian(m, flow, mu=2.0, c2=0.25, mean_image=None, calls=None):
    """The exact denoiser of a per-pixel prior N(mu, c2) at any size (flow through the VE-ised x / alpha,
    sigma / alpha). mean_image: a full-resolution mean, area-resized to the size the model is called at."""
    def denoise(x, sigma, **_):
        if calls is not None:
            calls.append(tuple(x.shape[-2:]))
        s = torch.as_tensor(sigma, dtype=F64).reshape(-1, *([1] * (x.ndim - 1)))
        alpha = 1 - s if flow else torch.ones_like(s)
        mean = mu if mean_image is None else m.bn.resize(mean_image, x.shape[-2:])
        return mean + c2 / (c2 + (s / alpha) ** 2) * (x / alpha - mean)
    return denoise


def schedule(flow, n, smax=80.0, smin=0.01):
    """n levels then 0: flow uniform in sigma from 1; VE uniform in log sigma."""
    if flow:
        inner = torch.linspace(1.0, smin, n, dtype=F64)
    else:
        inner = torch.exp(torch.linspace(torch.log(torch.tensor(smax)), torch.log(torch.tensor(smin)), n, dtype=F64))
    return torch.cat([inner, inner.new_zeros(1)])


def start_noise(sigmas, shape, flow, seed=0):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return x if flow else x * sigmas[0]


def smooth_image():
    yy, xx = torch.meshgrid(torch.arange(16, dtype=F64), torch.arange(16, dtype=F64), indexing="ij")
    return (torch.sin(2 * torch.pi * (xx + 0.5) / 16) * torch.cos(2 * torch.pi * (yy + 0.5) / 16)).expand(1, 4, 16, 16)


def seeded(x, seed):
    return default_noise_sampler(x, seed=seed)  # ComfyUI's: full-resolution noise, one draw per call


@pytest.mark.parametrize("flow", [False, True])
def test_one_stage_is_ddim_and_stage0_follows_user_sigmas(m, flow):
    sigmas = schedule(flow, 10, smax=14.6, smin=0.03)
    x = start_noise(sigmas, (4, 4, 8, 8), flow)
    model, p = oracle(m, flow), param(m, flow)
    ref_states = []
    ref = m.multistep.sample_ddim(model, x, sigmas, param=p, callback=lambda d: ref_states.append(d["x"]))
    one = m.bn.sample_bottleneck(model, x, sigmas, param=p, scales=(1.0,), fractions=(1.0,), strengths=(1.0,),
                                 shifts=(1.0,))
    assert torch.equal(one, ref)
    states, stats = [], {}
    three = m.bn.sample_bottleneck(model, x, sigmas, param=p, scales=(1.0, 1.0, 1.0), noise_sampler=seeded(x, 0),
                                   callback=lambda d: states.append((d["i"], d["x"])), stats=stats)
    n0 = stats["steps"][0]
    assert stats["steps"] == [2, 6, 2] and [i for i, _ in states] == list(range(10))
    for (_, a), b in zip(states[:n0], ref_states[:n0]):
        assert torch.equal(a, b)
    assert not torch.equal(states[n0][1], ref_states[n0])  # stage 1 restarts: re-noised, not the plain run
    assert three.shape == x.shape and bool(torch.isfinite(three).all())


def exact_gaussian_solver(m, flow, mu, c2):
    """A `solver` for the prior N(mu, c2): the exact PF-ODE flow from sigmas[0] to sigmas[-1] (no step error),
    x_bar1 = mu + sqrt(c2 + sb1^2) (x - alpha0 mu) / sqrt(alpha0^2 c2 + s0^2), x1 = alpha1 x_bar1."""
    def solve(model, x, sigmas, extra_args=None, callback=None, disable=None):
        p = param(m, flow)
        s0, s1 = sigmas[0].to(F64), sigmas[-1].to(F64)
        a0, a1 = p.alpha(s0), p.alpha(s1)
        z = (x - a0 * mu) / torch.sqrt(a0 ** 2 * c2 + s0 ** 2)
        return a1 * mu + torch.sqrt(a1 ** 2 * c2 + s1 ** 2) * z
    return solve


@pytest.mark.parametrize("flow", [False, True])
def test_renoising_keeps_the_prior_law(m, flow):
    """Per-pixel prior N(2, 0.25) and an exact stage solver: every stage starts from x0_hat re-noised with the
    model's own interpolant, i.e. on the exact marginal at sigma_k, so after all stages the samples have the prior's
    mean and variance (a VE re-noise on a flow model, or the reverse, moves both)."""
    mu, c2 = 2.0, 0.25
    sigmas = schedule(flow, 12)
    x = start_noise(sigmas, (8, 4, 32, 32), flow, seed=1)
    solver = exact_gaussian_solver(m, flow, mu, c2)
    run = lambda scales: m.bn.sample_bottleneck(gaussian(m, flow, mu, c2), x, sigmas, param=param(m, flow),
                                                scales=scales, strengths=(1.0, 0.8, 0.6), solver=solver,
                                                noise_sampler=seeded(x, 3))
    out = run((1.0, 1.0, 1.0))
    assert abs(out.mean().item() - mu) < 0.01
    assert abs(out.var().item() / c2 - 1) < 0.03
    low = run((1.0, 0.5, 1.0))
    assert abs(low.mean().item() - mu) < 0.01  # area averaging and bicubic keep the mean through the low stage


@pytest.mark.parametrize("flow", [False, True])
def test_low_stage_runs_small_and_carries_a_smooth_image(m, flow):
    sigmas = schedule(flow, 10)
    x = start_noise(sigmas, (256, 4, 16, 16), flow, seed=2)
    image = smooth_image()
    calls, frames, stats = [], [], {}
    model = gaussian(m, flow, c2=0.04, mean_image=image, calls=calls)
    out = m.bn.sample_bottleneck(model, x, sigmas, param=param(m, flow), strengths=(1.0, 0.8, 0.3),
                                 noise_sampler=seeded(x, 4), stats=stats,
                                 callback=lambda d: frames.append((d["i"], d["x"].shape, d["denoised"].shape)))
    assert calls == [(16, 16)] * 2 + [(8, 8)] * 6 + [(16, 16)] * 2
    assert stats["steps"] == [2, 6, 2] and stats["sizes"] == [(16, 16), (8, 8), (16, 16)]
    assert stats["pixel_steps"] == pytest.approx((2 + 6 / 4 + 2) / 10)
    assert [f[0] for f in frames] == list(range(10)) and all(f[1] == f[2] == x.shape for f in frames)
    # Strength w restarts at flow-equivalent time w t(sigma_max): sigma = w for flow from 1, t / (1 - t) for VE.
    t_max = 1.0 if flow else 80.0 / 81.0
    expect = [w * t_max if flow else w * t_max / (1 - w * t_max) for w in (1.0, 0.8, 0.3)]
    assert stats["start_sigmas"] == pytest.approx(expect, rel=1e-6)
    # The sample mean is the smooth image: the low stage's estimate went down and back up without a shift.
    err = (out.mean(0, keepdim=True) - image).pow(2).mean().sqrt().item()
    assert err < 0.03, err


def test_resize_is_anti_aliased(m):
    board = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 2.0 - 1.0 + 3.0  # values 2 and 4
    x = board.expand(2, 4, 8, 8).to(F64)
    assert torch.allclose(m.bn.resize(x, (4, 4)), torch.full((2, 4, 4, 4), 3.0, dtype=F64))
    video = board.expand(1, 4, 3, 8, 8).to(F64)
    assert torch.allclose(m.bn.resize(video, (2, 2)), torch.full((1, 4, 3, 2, 2), 3.0, dtype=F64))
    rand = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert torch.allclose(m.bn.resize(rand, (4, 4)), torch.nn.functional.avg_pool2d(rand, 4))  # a box, not a tap
    ramp = torch.arange(4, dtype=F64).expand(1, 1, 4, 4)
    up = m.bn.resize(ramp, (8, 8))
    assert up.shape == (1, 1, 8, 8) and torch.allclose(up.mean(), ramp.mean())
    assert m.bn.resize(x, (8, 8)) is x
    # Down and back up keeps a smooth image in place (nearest, 0.137, or corner-aligned bicubic, 0.077, do not).
    image = smooth_image()
    assert (m.bn.resize(m.bn.resize(image, (8, 8)), (16, 16)) - image).pow(2).mean().sqrt().item() < 0.055


def test_clear_errors(m):
    sigmas = schedule(True, 6)
    model = gaussian(m, True)
    x = torch.zeros(1, 4, 10, 10, dtype=F64)
    with pytest.raises(ValueError, match=r"10x10 into 5x5.*divisible by 2"):
        m.bn.sample_bottleneck(model, x, sigmas, param=m.core.FLOW)
    with pytest.raises(ValueError, match=r"10x10 into 3x3"):
        m.bn.sample_bottleneck(model, x, sigmas, param=m.core.FLOW, scales=(1.0, 0.3, 1.0))
    x = torch.zeros(1, 4, 8, 8, dtype=F64)
    with pytest.raises(ValueError, match="same length"):
        m.bn.sample_bottleneck(model, x, sigmas, param=m.core.FLOW, fractions=(0.5, 0.5))
    with pytest.raises(ValueError, match="end with 1.0"):
        m.bn.sample_bottleneck(model, x, sigmas, param=m.core.FLOW, scales=(1.0, 1.0, 0.5))
    with pytest.raises(ValueError, match="strengths"):
        m.bn.sample_bottleneck(model, x, sigmas, param=m.core.FLOW, strengths=(1.0, 1.2, 0.5))
    with pytest.raises(ValueError, match="3 stages need at least 3 steps, got 2"):
        m.bn.sample_bottleneck(model, x, sigmas[-3:], param=m.core.FLOW)
    with pytest.raises(ValueError, match="raise strengths"):
        m.bn.sample_bottleneck(model, x, sigmas, param=m.core.FLOW, strengths=(1.0, 0.8, 0.005))


def test_step_split_and_determinism(m):
    assert m.bn.split_steps(50, (0.2, 0.55, 0.25)) == [10, 28, 12]
    assert m.bn.split_steps(3, (0.01, 0.98, 0.01)) == [1, 1, 1]
    assert m.bn.split_steps(34, (6, 20, 8)) == [6, 20, 8]
    sigmas = schedule(True, 8)
    x = start_noise(sigmas, (2, 4, 16, 16), True, seed=5)
    run = lambda seed: m.bn.sample_bottleneck(gaussian(m, True), x, sigmas, param=m.core.FLOW,
                                              noise_sampler=seeded(x, seed))
    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("flow", [False, True])
def test_stage_schedules_shift_and_endpoints(m, flow):
    p, sigmas = param(m, flow), schedule(flow, 10).float()
    scheds = m.bn.stage_schedules(sigmas, [2, 6, 2], (1.0, 0.8, 0.6), (3.0, 3.0, 3.0), p)
    t = lambda s: s if flow else s / (1 + s)
    assert [len(s) - 1 for s in scheds] == [2, 6, 2] and all(s[-1] == 0 and s.dtype == sigmas.dtype for s in scheds)
    assert all(bool((s[1:] < s[:-1]).all()) for s in scheds)
    assert scheds[0][0] == sigmas[0] and scheds[0][1] > sigmas[1]  # shifted toward high noise, start kept
    lo = t(sigmas[-2].double())
    for k, w in ((1, 0.8), (2, 0.6)):
        u = t(scheds[k][:-1].double())
        assert u[0].item() == pytest.approx(w * t(sigmas[0].double()).item(), rel=1e-5)
        assert u[-1].item() == pytest.approx(lo.item(), rel=1e-5)
        if len(u) > 2:  # shift 3: the first step is shorter than uniform
            assert (u[0] - u[1]) < 0.5 * (u[0] - lo) / (len(u) - 1)
    # A schedule ending above 0 (no final denoise): the last stage ends there too, and only stage 0 jumps to 0.
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=F64)
    stats = {}
    out = m.bn.sample_bottleneck(gaussian(m, flow), x * sigmas[0].double(), sigmas[:-1].double(), param=p,
                                 noise_sampler=seeded(x, 0), stats=stats)
    last = stats["schedules"][-1]
    assert len(last) - 1 == stats["steps"][-1] and last[-1] == pytest.approx(sigmas[-2].item())
    assert sum(stats["steps"]) == 9 and bool(torch.isfinite(out).all())
