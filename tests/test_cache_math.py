"""Cache policies (samplers/cache.py) on plain tensors, against hand-computed values.

InvarDiff's change rates on synthetic streams (with and without the stale-reference plan), the allowed calls,
per-family quantile plans, the step gate, Plan's rules and JSON form, the two calibration phases, and the
adaptive reuse test (accumulated or latest change, window, streak cap, per-chunk state)."""
import math

import pytest
import torch

F64 = torch.float64
V = torch.tensor([1.0, -2.0, 3.0], dtype=F64)  # mean|V| = 2


@pytest.fixture(scope="module")
def c(stride):
    return stride("samplers.cache")


def stream(meter, values, chunk=0, unit="a"):
    """Feed o_t = values[t] * V for t = 0, 1, ...; return the rates update() reports."""
    return [meter.update(chunk, t, unit, x * V) for t, x in enumerate(values)]


def test_rel_l1(c):
    """rel_l1 is mean|a - b| / mean|b|."""
    a, b = torch.tensor([3.0, 2.0]), torch.tensor([1.0, 2.0])
    assert c.rel_l1(a, b) == pytest.approx(1.0 / 1.5)


def test_rates_without_plan(c):
    """o_t = t^2 v gives rho_t = (2t - 1) / (2t - 3) from t = 2 on, None before."""
    rates = stream(c.RateMeter(), [t * t for t in range(6)])
    assert rates[:2] == [None, None]
    for t in range(2, 6):
        assert rates[t] == pytest.approx((2 * t - 1) / (2 * t - 3))


def test_mean_over_chunks_and_runs(c):
    """mean() averages over chunks and runs; end_run resets references but keeps the sums; NaN where undefined."""
    meter = c.RateMeter()
    stream(meter, [t * t for t in range(5)], chunk=0)
    stream(meter, [2.0 ** t for t in range(5)], chunk=1)  # rate 2 everywhere
    meter.end_run()
    second = stream(meter, [3.0 ** t for t in range(5)], chunk=0)  # rate 3 everywhere
    assert second[:2] == [None, None]  # the references were reset
    got = meter.mean(6, ["a", "b"])
    assert got.shape == (6, 2)
    for t in range(2, 5):
        assert got[t, 0].item() == pytest.approx(((2 * t - 1) / (2 * t - 3) + 2 + 3) / 3)
    assert got[:2].isnan().all() and got[5].isnan().all() and got[:, 1].isnan().all()
    assert meter.mean(3, ["a"])[2, 0].item() == pytest.approx((3 + 2 + 3) / 3)


def test_rates_with_plan_keep_stale_reference(c):
    """A unit cached at t = 3 keeps o_2 and |o_2 - o_1| as its reference for t = 4, and t = 5 uses |o_4 - o_2|."""
    cache = torch.zeros(6, 1, dtype=torch.bool)
    cache[3, 0] = True
    plan = c.Plan(["a"], ["f"], cache, torch.zeros(6, dtype=torch.bool))
    values = [0.0, 1.0, 3.0, 4.0, 10.0, 11.0]  # differences 1, 2, 1, 6, 1
    plain = stream(c.RateMeter(), values)
    assert plain[2:] == pytest.approx([2.0, 0.5, 6.0, 1.0 / 6.0])
    stale = stream(c.RateMeter(plan), values)
    assert stale[:2] == [None, None]
    assert stale[2:] == pytest.approx([2.0, 0.5, 7.0 / 2.0, 1.0 / 7.0])


def test_allowed_steps(c):
    """Allowed: from the first call at or past nonskip * T (never call 0) to T - 2 (never the last)."""
    assert c.allowed_steps(10, 0.3).nonzero().flatten().tolist() == list(range(3, 9))
    assert c.allowed_steps(10, 0.0).nonzero().flatten().tolist() == list(range(1, 9))
    assert c.allowed_steps(7, 0.5).nonzero().flatten().tolist() == [4, 5]
    for calls in range(1, 30):
        for k in range(21):  # nonskip = k / 20, checked in exact integer arithmetic
            expected = [t >= 1 and 20 * t >= k * calls and t <= calls - 2 for t in range(calls)]
            assert c.allowed_steps(calls, k / 20).tolist() == expected, (calls, k)


def family_rates():
    """10 calls, columns attn, attn, mlp at scales 1e-3 and 1e3; NaN at (4, 0); zeros in the disallowed rows."""
    g = torch.Generator().manual_seed(0)
    rates = torch.empty(10, 3, dtype=F64)
    rates[1:9, :2] = 1e-3 * (torch.randperm(16, generator=g).to(F64) + 1).reshape(8, 2)
    rates[1:9, 2] = 1e3 * (torch.randperm(8, generator=g).to(F64) + 1)
    rates[[0, 9]] = 0.0
    rates[4, 0] = math.nan
    return rates


def smallest(rates, rows, cols, k):
    """Mask of the k smallest defined entries of rates[rows, cols]."""
    entries = sorted((rates[t, u].item(), t, u) for t in rows for u in cols if not math.isnan(rates[t, u]))
    mask = torch.zeros(rates.shape, dtype=torch.bool)
    for _, t, u in entries[:k]:
        mask[t, u] = True
    return mask


def test_quantile_plan_per_family(c):
    """tau = 0.5 caches 7 of attn's 15 defined entries and 4 of mlp's 8, each its own smallest; never NaN."""
    rates, families = family_rates(), ["attn", "attn", "mlp"]
    plan = c.quantile_plan(rates, families, 0.5, 0.1)  # allowed rows 1..8
    # torch.quantile interpolates: attn 15 values -> position 7 (the 8th value, strict <: 7); mlp 8 -> 3.5 (4).
    expected = smallest(rates, range(1, 9), [0, 1], 7) | smallest(rates, range(1, 9), [2], 4)
    assert torch.equal(plan, expected)
    assert not plan[[0, 9]].any() and not plan[4, 0]


def test_quantile_plan_extremes(c):
    """tau = 0 caches nothing; tau = 1 caches every defined allowed entry and nothing else."""
    rates, families = family_rates(), ["attn", "attn", "mlp"]
    assert not c.quantile_plan(rates, families, 0.0, 0.1).any()
    allowed = torch.zeros(10, 1, dtype=torch.bool)
    allowed[1:9] = True
    assert torch.equal(c.quantile_plan(rates, families, 1.0, 0.1), allowed & ~rates.isnan())


def test_step_gate(c):
    """Low step rates at calls 1, 2, 3 gate 1 and 3 (2 follows a gated call); never two gated calls in a row."""
    step = torch.tensor([0.0, 0.1, 0.2, 0.3, 5, 6, 7, 8, 9, 0.0], dtype=F64)
    assert c.step_gate(step, 0.5, 0.1).nonzero().flatten().tolist() == [1, 3]
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        gate = c.step_gate(torch.rand(12, generator=g, dtype=F64), 0.7, 0.0)
        assert gate.any() and not (gate[1:] & gate[:-1]).any()


def sample_plan(c):
    cache = torch.tensor([[0, 0], [0, 0], [1, 1], [1, 0]], dtype=torch.bool)
    return c.Plan(["a", "b"], ["attn", "mlp"], cache, torch.tensor([0, 1, 0, 0], dtype=torch.bool))


def test_plan_rules(c):
    """A gated call caches every unit and "step"; the next call computes everything; share() is 3 of 8."""
    plan = sample_plan(c)
    assert plan.cached(1, "a") and plan.cached(1, "b") and plan.cached(1, "step")
    assert not plan.cached(2, "a") and not plan.cached(2, "b") and not plan.cached(2, "step")
    assert plan.cached(3, "a") and not plan.cached(3, "b") and not plan.cached(3, "step")
    assert not plan.cached(0, "a") and not plan.cached(4, "a") and not plan.cached(99, "step")
    assert plan.share() == pytest.approx(3 / 8)


def test_plan_json(c):
    """to_json writes 0/1 strings (the cleared row included) and from_json reads the same plan back."""
    plan = sample_plan(c)
    data = plan.to_json()
    assert data == {"units": ["a", "b"], "families": ["attn", "mlp"], "cache": ["00", "00", "00", "10"],
                    "gate": "0100"}
    back = c.Plan.from_json(data)
    assert torch.equal(back.cache, plan.cache) and torch.equal(back.gate, plan.gate)
    assert back.units == plan.units and back.families == plan.families and back.to_json() == data


@pytest.mark.parametrize("change", [{"cache": ["00", "0", "00", "10"]}, {"cache": ["00", "0x", "00", "10"]},
                                    {"cache": ["00", "00", "10"]}, {"gate": "01a0"}, {"gate": "01000"}])
def test_plan_json_rejects_bad_rows(c, change):
    """Rows of the wrong length or count, or characters other than 0/1, raise ValueError."""
    data = dict(sample_plan(c).to_json(), **change)
    with pytest.raises(ValueError):
        c.Plan.from_json(data)


def test_fit_plan_two_phases(c):
    """measure(None), then measure(first plan); the final plan comes from the second measurement."""
    nan = math.nan
    phases = [(torch.tensor([[nan], [1], [2], [3], [nan]], dtype=F64), torch.tensor([nan, 3, 1, 2, nan], dtype=F64)),
              (torch.tensor([[nan], [3], [2], [1], [nan]], dtype=F64), torch.tensor([nan, 1, 3, 2, nan], dtype=F64))]
    seen = []

    def measure(plan):
        seen.append(plan)
        return phases[len(seen) - 1]

    final = c.fit_plan(measure, ["a"], ["f"], 0.5, 0.5, 0.0)
    assert len(seen) == 2 and seen[0] is None
    first = seen[1]  # phase 1: the smallest unit rate (t = 1) cached, the smallest step rate (t = 2) gated
    assert first.cache[:, 0].tolist() == [False, True, False, False, False]
    assert first.gate.tolist() == [False, False, True, False, False]
    assert final.cache[:, 0].tolist() == [False, False, False, True, False]
    assert final.gate.tolist() == [False, True, False, False, False]


def test_reuse_accumulate(c):
    """accumulate=True reuses while the sum since the last computed call stays below the threshold."""
    test = c.ReuseTest(1.0, 0.0, 1.0, 10, accumulate=True)
    assert [test.reuse(0, 0.4, 0.5) for _ in range(3)] == [True, True, False]  # 0.4, 0.8, 1.2
    test.computed(0)
    assert test.reuse(0, 0.9, 0.5) and not test.reuse(0, 0.2, 0.5)  # 0.9, then 1.1
    latest = c.ReuseTest(1.0, 0.0, 1.0, 10, accumulate=False)
    assert [latest.reuse(0, x, 0.5) for x in (0.4, 0.4, 0.4, 1.2, 0.9)] == [True, True, True, False, True]


def test_reuse_window_and_streak(c):
    """Reuse only inside [start, end] (inclusive) and at most max_hits in a row; computed() resets the streak."""
    test = c.ReuseTest(1.0, 0.2, 0.8, 2, accumulate=False)
    assert [test.reuse(0, 0.0, p) for p in (0.1, 0.2, 0.8, 0.9)] == [False, True, True, False]
    test = c.ReuseTest(1.0, 0.0, 1.0, 2, accumulate=False)
    assert [test.reuse(0, 0.0, 0.5) for _ in range(3)] == [True, True, False]
    test.computed(0)
    assert test.reuse(0, 0.0, 0.5)


def test_reuse_chunks_independent(c):
    """Each chunk keeps its own sum and streak; reset() clears all."""
    test = c.ReuseTest(1.0, 0.0, 1.0, 1, accumulate=True)
    assert test.reuse(0, 0.6, 0.5) and test.reuse(1, 0.6, 0.5)
    assert not test.reuse(0, 0.0, 0.5)  # chunk 0's streak is full
    test.computed(0)
    assert not test.reuse(1, 0.0, 0.5) and test.reuse(0, 0.6, 0.5)
    test.reset()
    assert test.reuse(1, 0.6, 0.5)
