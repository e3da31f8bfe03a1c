"""Cache policies, pure: when a model call (or one block of it) may reuse what an earlier call computed.

- InvarDiff (Wu 2025, arXiv:2512.05134): change rates rho_{t,u} = |o_t - o_{t-1}|_1 / |o_{t-1} - o_{t-2}|_1 of
  each unit's output, measured on calibration runs, thresholded at a quantile per unit family into a binary plan
  C[t][u], with the resampling correction (a second measurement in which a unit the first plan caches keeps its
  stale reference) and a step-level gate c[t] (its step forces the next to full compute).
- Adaptive reuse tests needing no calibration: an indicator (the model input's relative change, accumulated, or the
  first block's residual against the last computed one, as First Block Cache) below a threshold, inside a window of
  the noise range, at most `max_hits` reuses in a row.
"""
import math

import torch


def rel_l1(a, b):
    """mean|a - b| / mean|b|: the relative L1 change of a against b."""
    return float((a - b).abs().mean() / b.abs().mean().clamp_min(1e-12))


class RateMeter:
    """InvarDiff's change rates over a stream of unit outputs. update(t, unit, o) returns rho_{t,unit} (None while
    undefined: the first two outputs). With a plan, a unit marked cached at t keeps its reference output and norm
    (the resampling correction: the rate then includes the drift of consecutive reuse). Rates are summed per
    (t, unit) over chunks and runs; mean() averages them."""

    def __init__(self, plan=None):
        self.plan, self.state, self.sums = plan, {}, {}

    def update(self, chunk, t, unit, o):
        key = (chunk, unit)
        ref = self.state.get(key)
        if ref is None:
            self.state[key] = (o, None)
            return None
        diff = float((o - ref[0]).abs().mean())
        rate = diff / max(ref[1], 1e-12) if ref[1] is not None else None
        if self.plan is None or not self.plan.cached(t, unit):
            self.state[key] = (o, diff)
        if rate is not None:
            total, count = self.sums.get((t, unit), (0.0, 0))
            self.sums[(t, unit)] = (total + rate, count + 1)
        return rate

    def end_run(self):
        self.state = {}

    def mean(self, calls, units):
        """rates [calls, len(units)] averaged over chunks and runs, NaN where never defined."""
        rates = torch.full((calls, len(units)), math.nan, dtype=torch.float64)
        for (t, unit), (total, count) in self.sums.items():
            if t < calls and unit in units:
                rates[t, units.index(unit)] = total / count
        return rates


def allowed_steps(calls, nonskip):
    """InvarDiff's rule: never cache in the first `nonskip` share of the calls or in the last call."""
    mask = torch.zeros(calls, dtype=torch.bool)
    mask[max(math.ceil(nonskip * calls), 1):calls - 1] = True
    return mask


def quantile_plan(rates, families, tau, nonskip):
    """C[t, u] = rates[t, u] below the tau-quantile of its family's rates over the allowed calls (families: one
    name per unit column; tau roughly the share of cached entries). NaN rates are never cached."""
    allowed = allowed_steps(rates.shape[0], nonskip)
    plan = torch.zeros(rates.shape, dtype=torch.bool)
    if tau <= 0:
        return plan
    for family in sorted(set(families)):
        cols = torch.tensor([f == family for f in families])
        block = rates[allowed][:, cols]
        values = block[~block.isnan()]
        if values.numel() == 0:
            continue
        threshold = torch.quantile(values, min(tau, 1.0))
        sub = rates[:, cols] <= threshold if tau >= 1 else rates[:, cols] < threshold
        plan[:, cols] = sub & allowed[:, None]
    return plan


def step_gate(step_rates, tau_step, nonskip):
    """c[t]: the step-level rate below its tau_step-quantile over the allowed calls; a gated call forces the next
    one to full compute."""
    return spaced(quantile_plan(step_rates[:, None], ["step"], tau_step, nonskip)[:, 0])


def spaced(gate):
    """The gate with every call right after a gated one ungated (that call computes in full)."""
    gate = gate.clone()
    for t in range(1, len(gate)):
        if gate[t - 1]:
            gate[t] = False
    return gate


class Plan:
    """A cache plan: units (names), families (one per unit), cache [calls, units] booleans, gate [calls]; the
    calls are indexed per chunk in the order the sampler makes them. A gated call caches every unit, and the call
    after a gated one computes every unit."""

    def __init__(self, units, families, cache, gate):
        self.units, self.families = list(units), list(families)
        self.cache, self.gate = cache.clone(), spaced(gate)
        self.cache[1:][self.gate[:-1]] = False

    def cached(self, t, unit):
        if t >= len(self.gate):
            return False
        if unit == "step":
            return bool(self.gate[t])
        return bool(self.gate[t]) or bool(self.cache[t, self.units.index(unit)])

    def share(self):
        """The share of unit evaluations the plan skips (gated calls count all their units)."""
        skipped = (self.cache | self.gate[:, None]).sum()
        return float(skipped) / max(self.cache.numel(), 1)

    def to_json(self):
        rows = lambda mask: ["".join("1" if v else "0" for v in row) for row in mask.tolist()]
        return {"units": self.units, "families": self.families, "cache": rows(self.cache),
                "gate": "".join("1" if v else "0" for v in self.gate.tolist())}

    @classmethod
    def from_json(cls, data):
        units, cache, gate = data["units"], data["cache"], data["gate"]
        rows_fit = all(len(row) == len(units) and not set(row) - {"0", "1"} for row in cache)
        if len(cache) != len(gate) or len(data["families"]) != len(units) or not rows_fit or set(gate) - {"0", "1"}:
            raise ValueError("the cache plan's rows do not fit its units and calls")
        mask = torch.tensor([[c == "1" for c in row] for row in cache], dtype=torch.bool).reshape(len(gate), len(units))
        return cls(units, data["families"], mask, torch.tensor([c == "1" for c in gate], dtype=torch.bool))


def fit_plan(measure, units, families, tau, tau_step, nonskip):
    """InvarDiff's two calibration phases. measure(plan) runs the calibration and returns (unit rates [calls,
    units], step rates [calls]) with the stale-reference rule of `plan` (None: phase 1)."""
    rates, step = measure(None)
    first = Plan(units, families, quantile_plan(rates, families, tau, nonskip), step_gate(step, tau_step, nonskip))
    rates, step = measure(first)
    return Plan(units, families, quantile_plan(rates, families, tau, nonskip), step_gate(step, tau_step, nonskip))


class ReuseTest:
    """The adaptive reuse decision: per chunk, an indicator of change (accumulated since the last computed call,
    or the latest value alone) below `threshold`, progress through the noise range inside [start, end], and fewer
    than `max_hits` reuses in a row."""

    def __init__(self, threshold, start, end, max_hits, accumulate):
        self.threshold, self.start, self.end, self.max_hits = threshold, start, end, max_hits
        self.accumulate = accumulate
        self.state = {}

    def reset(self):
        self.state = {}

    def reuse(self, chunk, change, progress):
        """True: answer from the cache. False: compute (the caller then calls computed(chunk))."""
        entry = self.state.setdefault(chunk, {"change": 0.0, "streak": 0})
        entry["change"] = entry["change"] + change if self.accumulate else change
        if self.start <= progress <= self.end and entry["change"] < self.threshold and entry["streak"] < self.max_hits:
            entry["streak"] += 1
            return True
        return False

    def computed(self, chunk):
        self.state[chunk] = {"change": 0.0, "streak": 0}
