"""ParaDiGMS: parallel sampling by sliding-window Picard iteration (Shih et al. 2023, arXiv:2305.16317).

The sequential chain x_{j+1} = step_j(x_j) of Stride's first-order exponential integrator (DDIM, which is Euler in
sigma in both parameterizations) is solved as a fixed point: a window of p positions is evaluated in ONE batched
model call, and every position in it is updated from the cumulative sum of the step deltas,
X_new[j+1] = X[b] + sum_{b<=k<=j} (step_k(X_k) - X_k). The window slides past the positions that have converged.
It trades total model evaluations for fewer sequential rounds; it pays off only with idle parallel compute.
"""
import torch

from .core import VE, History, check_sigmas, per_sample
from .multistep import dpmpp_update


def _check(window, tolerance, sigmas):
    if isinstance(window, bool) or int(window) != window or window < 1:
        raise ValueError(f"Stride ParaDiGMS: window must be an integer >= 1 (positions per batched model call), "
                         f"got {window!r}")
    if not (float(tolerance) > 0.0) or tolerance == float("inf"):
        raise ValueError(f"Stride ParaDiGMS: tolerance must be a finite number > 0, got {tolerance!r}")
    check_sigmas(sigmas, "ParaDiGMS")


def sample_paradigms(model, x, sigmas, extra_args=None, callback=None, disable=None, param=VE, window=8,
                     tolerance=0.1, stats=None, order=1):
    """ParaDiGMS sliding-window Picard iteration over DDIM (Shih et al. 2023, arXiv:2305.16317, Algorithm 1).

    Each round evaluates the model once on the window [b, b+p), p = min(window, steps - b): rows are stacked
    position-major (position j at rows j*B .. j*B+B-1, so row r is sample r % B) with a per-row sigma, and the
    window is updated by exact Picard on the ODE (no noise). The update is written
    X_new[j+1] = step_j(X[j]) + (X_new[j] - X[j]), X_new[b] = X[b], which is the cumulative sum of the deltas
    with the first position computed exactly as the sequential step.
    Error: e_j = mean over the latent of (X_new[j+1] - X[j+1])^2 / s_j^2, with s_j = |sigma_j - sigma_{j+1}|
    (the notes' choice for ODE schedules, in place of the DDPM posterior variance), max over the batch. As in
    the reference code, the window advances by min(k + 1, p), k = the number of leading positions with
    e_j <= tolerance^2 (X[j+1] unchanged, so X_new[j+2] is final too); at least 1 (position b is exact).
    Positions past the old window start at its last value. window = 1 is the sequential DDIM, bit for bit.

    order 1 steps with DDIM, order 2 with DPM-Solver++ 2M: a position's step also uses the model output of the
    position before it, from the same round inside the window (the final one for the window's first position),
    as the paper's multistep para-scheduler keeps a history per position.

    stats (a dict) receives "rounds" (sequential model calls), "evaluations" (positions evaluated, i.e.
    per-image model evaluations; >= steps) and "steps". The callback runs once per step, in order, when the
    step becomes final: x is its accepted state, denoised the model output of the round that finalised it."""
    _check(window, tolerance, sigmas)
    if order not in (1, 2):
        raise ValueError(f"Stride ParaDiGMS: order must be 1 (DDIM) or 2 (DPM-Solver++ 2M), got {order!r}")
    extra_args = {} if extra_args is None else extra_args
    sigmas = param.capped(sigmas)
    steps = len(sigmas) - 1
    batch = x.shape[0]
    sig64 = torch.as_tensor(sigmas, dtype=torch.float64, device=x.device)
    scale2 = (sig64[:-1] - sig64[1:]).abs() ** 2       # s_j^2 per step
    tol2 = float(tolerance) ** 2
    X = [x] * (steps + 1)                                # the Picard buffer, all x_T
    b, rounds, evaluations = 0, 0, 0
    d_before = None  # the final model output of the position before the window (order 2)
    while b < steps:
        p = min(int(window), steps - b)
        # 1. One batched model call on the whole window, position-major rows.
        rows = torch.cat(X[b:b + p], 0)
        sigma_rows = sig64[b:b + p].repeat_interleave(batch)
        denoised = model(rows, sigma_rows.to(x.dtype), **extra_args).split(batch, 0)
        rounds, evaluations = rounds + 1, evaluations + p
        # 2.-3. Step deltas and their cumulative sums from X[b] (exact Picard, zero noise).
        new = [X[b]]
        for j in range(p):
            i = b + j
            s, t = per_sample(sigmas[i], x), per_sample(sigmas[i + 1], x)
            hist = History(2)
            previous = denoised[j - 1] if j > 0 else d_before
            if order == 2 and previous is not None:
                hist.push(previous, param.lam(per_sample(sigmas[i - 1], x)))
            hist.push(denoised[j], param.lam(s))
            stepped = dpmpp_update(param, X[i], s, t, hist, len(hist), denoised[j])
            new.append(stepped if j == 0 else stepped + (new[j] - X[i]))
        # 4. Error against the previous iterate, normalised by the step size, worst sample.
        err = torch.stack([((new[j + 1] - X[b + j + 1]).to(torch.float64) ** 2).reshape(batch, -1).mean(1).max()
                           for j in range(p)]) / scale2[b:b + p]
        ok = (err <= tol2).tolist()
        k = ok.index(False) if False in ok else p
        advance = min(k + 1, p)
        # 5. Write the window back; positions past it start from its last value.
        X[b + 1:b + p + 1] = new[1:]
        X[b + p + 1:min(b + advance + p, steps) + 1] = [new[p]] * (min(b + advance + p, steps) - b - p)
        if callback is not None:
            for j in range(advance):
                i = b + j
                callback({"x": X[i], "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised[j]})
        d_before = denoised[advance - 1]
        b += advance
    if stats is not None:
        stats.update(rounds=rounds, evaluations=evaluations, steps=steps)
    return X[steps]
