"""DC-Solver (Zhao et al. 2024, arXiv:2409.03755): dynamic compensation of the misalignment between the
predictor point, where the model was evaluated, and the corrected state the run continues from. Before step i
the newest buffer entry is replaced by the Lagrange interpolation of the last three model outputs at
tau_i = lambda_{i-1} + rho_i (lambda_i - lambda_{i-1}) (rho = 1: no change), for UniPC and for predictor-only
multistep solvers (DPM-Solver++, DDIM). The ratios rho_i are searched step by step against a reference
trajectory; cascade polynomial regression (CPR) predicts them for new (NFE, guidance) settings.

Stride interpolates in the half-log-SNR lambda (the solver's own variable, finite for flow models after the
first step), so its ratios are not the paper's (which used the VP time t) and are searched per model.
"""
import math

import torch

from ..core import VE, bcast
from ..multistep import sample_exponential
from ..plugins import Plugin
from ..schedules.common import mse

RHO_RANGE = (0.5, 1.5)  # the paper's optional bound, rho = 1 + 0.5 tanh(p)


class DCCompensation(Plugin):
    """The compensation as a plug-in: ratios[i] for step i (missing or 1: none; the first two steps have too
    short a buffer). record=True keeps each step's state after its corrector (the search's objective)."""
    history = 3

    def __init__(self, ratios, record=False):
        self.ratios, self.record = list(ratios), record

    def reset(self, param, sigmas):
        super().reset(param, sigmas)
        self.states = {}

    def compensate(self, i, x, hist):
        if self.record:
            self.states[i] = x
        rho = self.ratios[i] if i < len(self.ratios) else 1.0
        if rho == 1.0 or len(hist) < 3:
            return
        (m0, l0), (m1, l1), (m2, l2) = hist.items[:3]
        tau = l1 + rho * (l0 - l1)
        lams, ms = (l0, l1, l2), (m0, m1, m2)
        out = torch.zeros_like(m0)
        for k in range(3):
            w = torch.ones_like(tau)
            for j in range(3):
                if j != k:
                    w = w * (tau - lams[j]) / (lams[k] - lams[j])
            out = out + bcast(w, m0) * ms[k]
        hist.items[0] = (out, l0)


def sample_dc(model, x, sigmas, extra_args=None, callback=None, disable=None, param=VE, ratios=(),
              solver="unipc", order=2, variant="bh2", record=None):
    """UniPC (or DPM-Solver++ / DDIM: solver='dpmpp') with DC-Solver's compensation by `ratios`."""
    plugin = DCCompensation(ratios, record=record is not None)
    out = sample_exponential(model, x, sigmas, extra_args, callback, disable, param, solver, order, variant,
                             corrector=True, lower_order_final=True, plugins=[plugin])
    if record is not None:
        record.update(plugin.states)
    return out


def _golden(f, lo, hi, evals):
    """Minimise f on [lo, hi] by golden-section search with `evals` evaluations (1 is always tried)."""
    g = (math.sqrt(5) - 1) / 2
    best = (f(1.0), 1.0)
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(max(evals - 3, 0)):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return min(best, (fc, c), (fd, d))[1]


def search_ratios(model, x, sigmas, reference, param, solver="unipc", order=2, variant="bh2", evals=10):
    """Greedy step-by-step search (the paper's, with a golden-section search instead of AdamW: no gradients).
    reference[i]: the reference state at sigmas[i] (i = len(sigmas) - 1: the output). model should be a
    Memo: each trial reruns the sampler, and only its first new evaluation is not in the cache.
    Returns the ratios (one per step)."""
    steps = len(sigmas) - 1
    ratios = [1.0] * steps
    for i in range(2, steps):
        last = i == steps - 1  # the last step to 0 returns the compensated output itself: scored on the output

        def objective(rho):
            trial = ratios[:i] + [rho]
            if last:
                out = sample_dc(model, x, sigmas, param=param, ratios=trial, solver=solver, order=order,
                                variant=variant)
                return float(mse(out, reference[-1]).mean())
            states = {}
            sample_dc(model, x, sigmas[:i + 3], param=param, ratios=trial, solver=solver, order=order,
                      variant=variant, record=states)
            return float(mse(states[i + 1], reference[i + 1]).mean())
        ratios[i] = _golden(objective, *RHO_RANGE, evals)
    return ratios


def cpr_features(nfe, cfg, steps_index):
    """The 36 features of cascade polynomial regression: u^j c^k n^m (j < 4, k < 3, m < 3) with c = cfg / 12,
    n = nfe / 50, u = step / nfe (the paper's variables)."""
    c, n, u = cfg / 12.0, nfe / 50.0, torch.as_tensor(steps_index, dtype=torch.float64) / nfe
    return torch.stack([u ** j * c ** k * n ** m for j in range(4) for k in range(3) for m in range(3)], -1)


def cpr_fit(searched):
    """Least-squares CPR coefficients [36] from {(nfe, cfg): ratios} (the searched steps, 2 .. nfe - 1)."""
    rows, targets = [], []
    for (nfe, cfg), ratios in searched.items():
        idx = list(range(2, len(ratios)))
        rows.append(cpr_features(nfe, cfg, idx))
        targets.append(torch.tensor(ratios[2:], dtype=torch.float64))
    a, y = torch.cat(rows), torch.cat(targets)
    return torch.linalg.lstsq(a, y[:, None], driver="gelsd").solution[:, 0]


def cpr_ratios(coeffs, nfe, cfg):
    """Ratios for a new (NFE, cfg) from CPR coefficients: 1 for the first two steps, clamped to the search range."""
    pred = cpr_features(nfe, cfg, list(range(nfe))) @ coeffs
    pred = pred.clamp(*RHO_RANGE)
    pred[:2] = 1.0
    return pred.tolist()
