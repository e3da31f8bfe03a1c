"""Analytical teleportation and ReDi trajectory retrieval, pure math on plain tensors and the exact oracle."""

import pytest
import torch

LABELS = torch.full((8,), 3)  # one class: the calibration samples and the runs share the conditioning


@pytest.fixture(scope="module")
def m(stride, guided_oracle):
    class Modules:
        guided = staticmethod(guided_oracle)
        core = stride("samplers.core")
        multistep = stride("samplers.multistep")
        common = stride("samplers.schedules.common")
        tp = stride("samplers.teleport")
        redi = stride("samplers.redi")
    return Modules


def oracle(m, flow):
    return m.guided(flow, LABELS, 3.0)


def noise(flow, seed, batch=8):
    x = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x if flow else x * 14.6


def schedule(m, flow, steps):
    inner = torch.linspace(1.0, 0.01, steps, dtype=torch.float64) if flow else m.common.log_grid(14.6, 0.0292, steps)
    return torch.cat([inner, inner.new_zeros(1)])


def reference(m, d, x, sigmas, flow):
    return m.common.teacher_trajectory(d, x, sigmas[:-1], flow, refine=16)[0][-1]


def err(m, a, b):
    return float(m.common.mse(a, b).mean())


def test_gaussian_statistics_recover_a_low_rank_gaussian(m):
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(20, 3, generator=g, dtype=torch.float64))[0]
    scales = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    z = torch.randn(20000, 3, generator=g, dtype=torch.float64) * scales
    samples = 0.5 + z @ basis.T + 0.1 * torch.randn(20000, 20, generator=g, dtype=torch.float64)
    mu, u, lam, lam_res = m.tp.gaussian_stats(samples, 3)
    torch.testing.assert_close(mu, torch.full((20,), 0.5, dtype=torch.float64), atol=0.05, rtol=0)
    torch.testing.assert_close(lam, scales ** 2 + 0.01, rtol=0.05, atol=0)
    assert float(lam_res) == pytest.approx(0.01, rel=0.1)
    assert torch.allclose((u.T @ basis).abs().max(dim=1).values, torch.ones(3, dtype=torch.float64), atol=1e-2)


@pytest.mark.parametrize("flow", [False, True])
def test_teleport_is_the_exact_flow_of_the_gaussian_model(m, flow):
    """For data N(mu, U diag(lam) U^T + lam_res (I - U U^T)) the closed form equals a fine ODE solve."""
    p = m.core.FLOW if flow else m.core.VE
    g = torch.Generator().manual_seed(1)
    d = 4 * 8 * 8
    u = torch.linalg.qr(torch.randn(d, 5, generator=g, dtype=torch.float64))[0]
    stats = (torch.randn(d, generator=g, dtype=torch.float64) * 0.3, u,
             torch.tensor([4.0, 2.0, 1.0, 0.5, 0.2], dtype=torch.float64), torch.tensor(0.05, dtype=torch.float64))
    mu, _, lam, lam_res = stats

    def gauss(x, sigma, **_):
        sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(x.shape[0])
        a = p.alpha(sigma).view(-1, 1)
        vs2 = (sigma.view(-1, 1) / a) ** 2
        xt = x.flatten(1) / a - mu
        proj = xt @ u
        out = mu + (proj * lam / (lam + vs2)) @ u.T + lam_res / (lam_res + vs2) * (xt - proj @ u.T)
        return out.reshape(x.shape)
    sigmas = schedule(m, flow, 10)
    x = noise(flow, 2)
    jumped = m.tp.teleport(x, sigmas[0], sigmas[3], stats, p)
    fine = m.common.teacher_trajectory(gauss, x, sigmas[:4], flow, refine=64)[0][3]
    torch.testing.assert_close(jumped, fine, rtol=1e-4, atol=1e-4 * float(sigmas[3] + 1))


def test_teleport_on_the_flow_oracle_beats_the_same_evaluations_without_it(m):
    """Statistics from 64 model samples of one class; 10 steps with the first 2 teleported (8 evaluations) against
    8 plain steps, both DPM-Solver++ 2M, on other noises."""
    d, p = oracle(m, True), m.core.FLOW
    samples = torch.cat([noise(True, s) for s in range(10, 18)])
    x0 = m.common.teacher_trajectory(d, samples, schedule(m, True, 24)[:-1], True)[0][-1]
    stats = m.tp.gaussian_stats(x0, 16)
    x = noise(True, 1)
    sigmas = schedule(m, True, 10)
    ref = reference(m, d, x, sigmas, True)
    teleported = err(m, m.tp.sample_teleport(d, x, sigmas, param=p, stats=stats, skip=0.2), ref)
    plain = err(m, m.multistep.sample_dpmpp(d, x, schedule(m, True, 8), param=p), ref)
    assert teleported < plain


def test_teleport_refuses_what_it_cannot_do(m):
    d, x, sigmas = oracle(m, False), noise(False, 0), schedule(m, False, 5)
    with pytest.raises(ValueError, match="no Gaussian statistics"):
        m.tp.sample_teleport(d, x, sigmas)
    stats = m.tp.gaussian_stats(torch.randn(8, 3, 4, 4, dtype=torch.float64), 2)
    with pytest.raises(ValueError, match="latents of 48 values, this one has 256"):
        m.tp.sample_teleport(d, x, sigmas, stats=stats)
    with pytest.raises(ValueError, match="skip must be in"):
        m.tp.skip_index(sigmas, 1.0)
    assert m.tp.skip_index(sigmas, 0.0) == 0 and m.tp.skip_index(sigmas, 0.99) == 4


def test_retrieval_combines_values_like_the_keys_combine_the_query(m):
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(6, 10, generator=g, dtype=torch.float64)
    values = torch.randn(6, 10, generator=g, dtype=torch.float64)
    w = torch.tensor([0.7, 0.3], dtype=torch.float64)
    query = (w[0] * keys[1] + w[1] * keys[4]).reshape(1, 2, 5)
    stats = {}
    out = m.redi.retrieve(query, keys, values, neighbours=6, residual_scale=0.5, stats=stats)
    torch.testing.assert_close(out.flatten(), w[0] * values[1] + w[1] * values[4], rtol=1e-4, atol=1e-4)
    assert stats["explained"] == [pytest.approx(1.0, abs=1e-6)]
    # A query orthogonal to every key: nothing explained, nothing retrieved; carry adds exactly scale * query.
    flat_keys = torch.cat([keys[:, :5], torch.zeros(6, 5, dtype=torch.float64)], 1)
    ortho = torch.cat([torch.zeros(5, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)])[None]
    plain = m.redi.retrieve(ortho, flat_keys, values, neighbours=3, stats=stats)
    assert stats["explained"] == [pytest.approx(0.0, abs=1e-9)]
    torch.testing.assert_close(plain, torch.zeros_like(ortho), rtol=0, atol=1e-9)
    torch.testing.assert_close(m.redi.retrieve(ortho, flat_keys, values, neighbours=3, residual_scale=0.5),
                               0.5 * ortho, rtol=0, atol=1e-9)


def test_redi_with_its_own_trajectory_in_the_knowledge_base_resumes_on_it(m):
    """If the run's own key is in the knowledge base, retrieval returns its value: the result is the plain run
    with the solver restarted at the value step."""
    d, p = oracle(m, False), m.core.VE
    sigmas = schedule(m, False, 8)
    solve = lambda x, s: m.multistep.sample_ddim(d, x, s, param=p)
    others = torch.cat([noise(False, s) for s in range(20, 24)])
    x = noise(False, 4)
    kb = m.redi.build(solve, torch.cat([x, others]), sigmas, 2, 5)
    out = m.redi.sample_redi(d, x, sigmas, knowledge=kb, key_step=2, value_step=5, neighbours=1,
                             solver=m.multistep.sample_ddim, param=p)
    torch.testing.assert_close(out, m.multistep.sample_ddim(d, x, sigmas, param=p), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="0 < key step"):
        m.redi.sample_redi(d, x, sigmas, knowledge=kb, key_step=5, value_step=2, solver=m.multistep.sample_ddim)
    with pytest.raises(ValueError, match="no knowledge base"):
        m.redi.sample_redi(d, x, sigmas, solver=m.multistep.sample_ddim)


def test_redi_on_held_out_noises_gains_with_the_knowledge_base(m):
    """16 held-out noises on the EPS oracle, 10 steps, key 2, value 4, error (MSE) against the reference. Measured
    (knowledge base of 4 / 64 entries): ReDi's retrieved state alone 0.36 / 0.15, with the unexplained part
    carried (residual) 0.12 / 0.049; rescaling the key state by sigma_v / sigma_k instead of retrieving 0.17; DDIM
    with the same NFE (one step from key to value) 0.018: on this 256-value latent ReDi does not pay. The keys
    explain at most 21% of a run's state (12% of each other's): the nodes warn below 50%."""
    d, p = m.guided(False, torch.full((1,), 3), 3.0), m.core.VE
    sigmas = schedule(m, False, 10)
    solve = lambda x, s: m.multistep.sample_ddim(d, x, s, param=p)
    x = noise(False, 999, 16)
    ref = reference(m, d, x, sigmas, False)
    run = lambda kb, scale=0.0, stats=None: err(m, m.redi.sample_redi(
        d, x, sigmas, knowledge=kb, key_step=2, value_step=4, solver=m.multistep.sample_ddim, param=p,
        residual_scale=scale, stats=stats), ref)
    small, large = (m.redi.build(solve, noise(False, 1, n), sigmas, 2, 4) for n in (4, 64))
    stats = {}
    plain_small, plain_large = run(small), run(large, stats=stats)
    carry = float(sigmas[4] / sigmas[2])
    assert plain_large < 0.6 * plain_small and run(large, carry) < 0.6 * run(small, carry)
    assert run(large, carry) < 0.5 * plain_large
    rescaled = err(m, solve(solve(x, sigmas[:3]) * carry, sigmas[4:]), ref)
    assert plain_large < 0.9 * rescaled
    same_nfe = err(m, solve(x, torch.cat([sigmas[:3], sigmas[4:]])), ref)
    assert same_nfe < 0.5 * run(large, carry)
    assert max(stats["explained"]) < 0.5 and m.redi.self_explained(large[0]) < 0.5  # the warnings' measure
