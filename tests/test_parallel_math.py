"""ParaDiGMS (samplers/parallel.py) against the sequential DDIM on the exact oracle, EPS and flow.

window = 1 is the sequential sampler bit for bit; a tight tolerance converges to it; the default tolerance stays
close in fewer sequential rounds; the model is called once per round with position-major rows; a label-dependent
denoiser catches a wrong row order; bad options are refused."""
import pytest
import torch

LABELS = torch.tensor([0, 3, 5, 8, 1, 9, 2, 7])
RANGES = {False: (0.0292, 14.6), True: (0.01, 1.0)}
BATCH = 4


@pytest.fixture(scope="module")
def m(stride, guided_oracle):
    class Modules:
        guided = staticmethod(guided_oracle)
        core = stride("samplers.core")
        multistep = stride("samplers.multistep")
        parallel = stride("samplers.parallel")
        common = stride("samplers.schedules.common")
    return Modules


def oracle(m, flow, cfg=3.0, batch=BATCH):
    """The exact guided oracle (float64); row r carries the label of sample r % batch."""
    return m.guided(flow, LABELS[:batch], cfg)


def start(flow, seed, batch=BATCH):
    x = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x if flow else x * RANGES[False][1]


def schedule(m, flow, steps):
    smin, smax = RANGES[flow]
    inner = torch.linspace(smax, smin, steps, dtype=torch.float64) if flow else m.common.log_grid(smax, smin, steps)
    return torch.cat([inner, inner.new_zeros(1)])


def param(m, flow):
    return m.core.FLOW if flow else m.core.VE


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def counted(model, calls):
    """Record (batch, sigma rows) of every call."""
    def wrapped(x, sigma, **kw):
        calls.append((x.shape[0], sigma.clone()))
        return model(x, sigma, **kw)
    return wrapped


@pytest.mark.parametrize("flow", [False, True])
def test_window_one_is_sequential_ddim(m, flow):
    den, x, sig = oracle(m, flow), start(flow, 1), schedule(m, flow, 10)
    ref = m.multistep.sample_ddim(den, x, sig, param=param(m, flow))
    stats = {}
    out = m.parallel.sample_paradigms(den, x, sig, param=param(m, flow), window=1, stats=stats)
    assert torch.equal(out, ref), (out - ref).abs().max()
    assert stats == {"rounds": 10, "evaluations": 10, "steps": 10}


@pytest.mark.parametrize("flow,steps", [(False, 20), (True, 12)])
def test_converges_to_sequential_ddim(m, flow, steps):
    den, x, sig, pr = oracle(m, flow), start(flow, 2), schedule(m, flow, steps), param(m, flow)
    ref = m.multistep.sample_ddim(den, x, sig, param=pr)
    tight, loose = {}, {}
    out = m.parallel.sample_paradigms(den, x, sig, param=pr, window=steps, tolerance=1e-8, stats=tight)
    assert rel(out, ref) < 1e-6, rel(out, ref)
    out = m.parallel.sample_paradigms(den, x, sig, param=pr, window=8, tolerance=0.1, stats=loose)
    # Measured: 5.1e-3 (EPS, 20 steps, 15 rounds) and 2.8e-3 (flow, 12 steps, 8 rounds) relative to DDIM.
    assert rel(out, ref) < 1e-2, rel(out, ref)
    assert loose["rounds"] < steps, loose
    assert tight["rounds"] <= steps and tight["evaluations"] >= steps, tight


@pytest.mark.parametrize("flow", [False, True])
def test_stats_and_batched_calls(m, flow):
    steps, window = 20, 8
    den, x, sig, pr = oracle(m, flow), start(flow, 3), schedule(m, flow, steps), param(m, flow)
    calls, stats = [], {}
    m.parallel.sample_paradigms(counted(den, calls), x, sig, param=pr, window=window, tolerance=0.1, stats=stats)
    assert stats["steps"] == steps
    assert len(calls) == stats["rounds"] < steps, stats   # fewer sequential rounds than steps on a smooth problem
    assert stats["evaluations"] == sum(n for n, _ in calls) // BATCH >= steps
    capped = pr.capped(sig)
    covered = set()
    for n, sigma in calls:
        p = n // BATCH
        assert n == p * BATCH and 1 <= p <= window
        rows = sigma.view(p, BATCH)                          # position-major: one sigma per block of B rows
        assert torch.equal(rows, rows[:, :1].expand(p, BATCH))
        first = int((capped - rows[0, 0]).abs().argmin())    # consecutive positions from the window start
        assert torch.allclose(rows[:, 0].double(), capped[first:first + p])
        covered.update(range(first, first + p))
    assert covered == set(range(steps))
    # window = 1: one sequential call per step, each of batch B.
    calls, stats = [], {}
    m.parallel.sample_paradigms(counted(den, calls), x, sig, param=pr, window=1, stats=stats)
    assert stats["rounds"] == stats["evaluations"] == steps == len(calls)
    assert all(n == BATCH for n, _ in calls)


@pytest.mark.parametrize("flow", [False, True])
def test_label_dependent_rows(m, flow):
    """A Gaussian denoiser whose mean depends on LABELS[r % B]: a wrong row order feeds samples the wrong label."""
    means = LABELS[:BATCH].double() * 2.0 - 6.0
    var = 0.5

    def den(x, sigma, **_):
        sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(x.shape[0])
        a = 1 - sigma if flow else torch.ones_like(sigma)
        mu = means.repeat(x.shape[0] // BATCH).view(-1, 1, 1, 1)
        gain = (a * var / (a * a * var + sigma * sigma)).view(-1, 1, 1, 1)
        return mu + gain * (x - a.view(-1, 1, 1, 1) * mu)

    steps, x, pr = 16, start(flow, 4), param(m, flow)
    sig = schedule(m, flow, steps)
    ref = m.multistep.sample_ddim(den, x, sig, param=pr)
    out = m.parallel.sample_paradigms(den, x, sig, param=pr, window=6, tolerance=1e-9)
    assert (out - ref).abs().max() < 1e-6 * ref.abs().max()
    # The labels matter: samples end near their own means (a mix-up would move them by >= 2).
    per_sample = ref.mean(dim=(1, 2, 3))
    assert (per_sample - means).abs().max() < 0.5, per_sample


def test_callback_once_per_step_in_order(m):
    steps = 15
    den, x, sig = oracle(m, False), start(False, 5), schedule(m, False, steps)
    seq, par = [], []
    m.multistep.sample_ddim(den, x, sig, callback=seq.append)
    m.parallel.sample_paradigms(den, x, sig, window=5, tolerance=1e-9, callback=par.append)
    assert [c["i"] for c in par] == list(range(steps))
    for a, b in zip(seq, par):
        assert float(a["sigma"]) == float(b["sigma"])
        assert rel(b["x"], a["x"]) < 1e-6 and rel(b["denoised"], a["denoised"]) < 1e-6


def test_refusals(m):
    den, x, sig = oracle(m, False), start(False, 6), schedule(m, False, 5)
    with pytest.raises(ValueError, match="window"):
        m.parallel.sample_paradigms(den, x, sig, window=0)
    for tol in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="tolerance"):
            m.parallel.sample_paradigms(den, x, sig, tolerance=tol)
    for bad in (torch.tensor([5.0, 5.0, 1.0, 0.0]), torch.tensor([1.0, 2.0, 0.0])):
        with pytest.raises(ValueError, match="decrease"):
            m.parallel.sample_paradigms(den, x, bad)


def test_zero_steps_returns_input(m):
    x = start(False, 7)
    stats = {}
    out = m.parallel.sample_paradigms(lambda *a, **k: pytest.fail("no model call"), x, torch.tensor([1.0]),
                                      stats=stats)
    assert torch.equal(out, x) and stats == {"rounds": 0, "evaluations": 0, "steps": 0}


@pytest.mark.parametrize("flow", [False, True])
def test_order_two_is_dpm_solver_pp_2m_picard(m, flow):
    """order 2: window 1 is DPM-Solver++ 2M bit for bit; a large window with a tiny tolerance converges to it in
    fewer rounds than steps; a bad order is refused."""
    d, p = oracle(m, flow), m.core.FLOW if flow else m.core.VE
    x, sigmas = start(flow, 0), schedule(m, flow, 20)
    ref = m.multistep.sample_dpmpp(d, x, sigmas, param=p, order=2)
    assert torch.equal(m.parallel.sample_paradigms(d, x, sigmas, param=p, window=1, order=2), ref)
    stats = {}
    out = m.parallel.sample_paradigms(d, x, sigmas, param=p, window=8, tolerance=1e-8, order=2, stats=stats)
    assert float((out - ref).norm() / ref.norm()) < 1e-6 and stats["rounds"] < stats["steps"]
    with pytest.raises(ValueError, match="order must be 1"):
        m.parallel.sample_paradigms(d, x, sigmas, param=p, order=3)
