"""Bespoke solvers (Shaul et al., "Bespoke Solvers for Generative Flow Models", ICLR 2024, arXiv:2310.19075).

A base Runge-Kutta solver (RK1: Euler; RK2: midpoint, the step's midpoint at the geometric mean of its sigmas as
ComfyUI's dpm_2) runs on a scale-time transformed ODE: x_bar(r) = s(r) x(t(r)) with r uniform in [0, 1], whose
per-node times t_j, time derivatives, scales s_j and scale derivatives are learned for the user's model. The ODE is
the PF-ODE in the model's own variables, dx/dsigma = (x - D) / sigma (VE for EPS models, the flow velocity for
flow models), so the identity parameters are ComfyUI's euler / dpm_2 on the base schedule, bit for bit. The
exponential-integrator variant (ei1 / ei2) is the same family started from the parameters that make each step DDIM /
DPM-Solver++(2S): a DDIM step is a scale-time Euler step (scale 1/sigma), in VE and flow variables alike.

Parameterization (all zero = the rk identity; order-consistent): the interior times move in log sigma by multipliers
exp(gap) of the base schedule's gaps (monotone by construction), a midpoint's place between its step's ends is
sigmoid(mid) in log sigma, each stage's time derivative is its secant times exp(dt), the scale s = exp(log_s)
(s_0 = 1), and each stage's relative scale derivative h s'/s is ds. The last step (to sigma 0) is an RK1 step.

Training: the paper's RMSE bound, sum_i M_i d_i, with d_i the RMSE of step i started on the teacher trajectory at
t_i against the teacher at t_{i+1}, and M_i the product of the later steps' Lipschitz bounds (the slope's Lipschitz
constant taken as lip / sigma, lip = 0 by default: measured, see Bespoke.lipschitz); the teacher is one
fine solve (Stride's UniPC-3) interpolated by cubic Hermite polynomials (states and slopes), so the learned times
can move freely and every step is evaluated in parallel, with gradients through the denoiser.
"""
import json
import math
from dataclasses import dataclass

import torch

from .core import bcast, ode_slope
from .schedules.common import checkpoint_calls, held_out_split, in_calls_of, log_grid, mse, teacher_trajectory

TEXT_VERSION = 1
# ei1 (DDIM) is Euler on a VE (EPS) model: they differ on flow models only
BASES = {"rk1": "Euler", "rk2": "midpoint (dpm_2)", "ei1": "DDIM", "ei2": "DPM-Solver++(2S)"}
ORDER = {"rk1": 1, "rk2": 2, "ei1": 1, "ei2": 2}


def _nfe(base, steps):
    return steps if ORDER[base] == 1 else 2 * steps - 1


def steps_for_nfe(base, nfe):
    """The most steps a solver of this base takes within `nfe` model evaluations per image (rk2: 2 per step, 1 on
    the last)."""
    if base not in BASES:
        raise ValueError(f"Stride Bespoke: unknown base {base!r}; choose from {sorted(BASES)}")
    return max(1, nfe if ORDER[base] == 1 else (nfe + 1) // 2)


@dataclass
class Bespoke:
    """A Bespoke solver: its base ('rk1' | 'rk2' | 'ei1' | 'ei2'), the base schedule (N steps ending in 0) and the
    free parameters (float64 tensors; Bespoke.identity gives the base solver on the base schedule: all zero for rk).
    to_text / from_text carry it as one line of JSON."""
    base: str
    sigmas: torch.Tensor
    gap: torch.Tensor    # [N-1] interior times: log-multipliers of the base gaps in log sigma
    mid: torch.Tensor    # [N-1] (rk2) or [0]: logits of the midpoints' places in log sigma (0: geometric mean)
    dt: torch.Tensor     # [S] per stage: log-multiplier of the time derivative on its secant
    log_s: torch.Tensor  # [S] log scale at nodes 1..S (s_0 = 1)
    ds: torch.Tensor     # [S] per stage: relative scale derivative h s'/s

    NAMES = ("gap", "mid", "dt", "log_s", "ds")

    @classmethod
    def identity(cls, base, sigmas, flow=False):
        """The base solver on the base schedule: rk1 / rk2 with all parameters 0; ei1 / ei2, the exponential
        integrators, as the parameters that make each step DDIM / DPM-Solver++(2S) (midpoint in the half-log-SNR
        of the model's parameterization, `flow`) exactly: a DDIM step from t to t' with A = t'/t is the scale-time
        Euler step with s'/s = 1/A, h t' = (t' - t) t/t' and h s'/s = 1/A - 1, in VE and flow variables alike."""
        if base not in BASES:
            raise ValueError(f"Stride Bespoke: unknown base {base!r}; choose from {sorted(BASES)}")
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu().clone()  # not an inference tensor
        if len(sigmas) < 2 or float(sigmas[-1]) != 0.0 or not bool((sigmas[1:] < sigmas[:-1]).all()):
            raise ValueError("Stride Bespoke: the base schedule must decrease strictly and end in 0, got "
                             f"{sigmas.tolist()}")
        n = len(sigmas) - 1
        stages = _nfe(base, n)
        z = lambda k: torch.zeros(k, dtype=torch.float64)
        out = cls(base, sigmas, z(n - 1), z(n - 1 if ORDER[base] == 2 else 0), z(stages), z(stages), z(stages))
        if base.startswith("ei"):
            out._exponential(flow)
        return out

    def _exponential(self, flow):
        """Set the parameters of the exponential integrator (see identity)."""
        inner = self.sigmas[:-1]
        if self.order == 2:  # the midpoint in lambda, as a place in log sigma
            lam = (lambda s_: -torch.logit(s_)) if flow else (lambda s_: -torch.log(s_))
            top = inner[:-1].clamp(max=1 - 1e-4) if flow else inner[:-1]
            mid_sigma = torch.sigmoid(-(lam(top) + lam(inner[1:])) / 2) if flow else (top * inner[1:]).sqrt()
            w = (mid_sigma.log() - inner[:-1].log()) / (inner[1:].log() - inner[:-1].log())
            self.mid = torch.logit(w)
        t = self.times()
        stages = len(t) - 1
        dt, ds = torch.zeros(stages, dtype=torch.float64), torch.zeros(stages, dtype=torch.float64)
        secant = self.coefficients()[1]
        log_scale = torch.zeros(stages + 1, dtype=torch.float64)
        for k in range(stages - 1):  # every stage but the last (to sigma 0: a final denoise, as Euler's)
            if self.order == 1 or k % 2 == 0:  # a DDIM step (a first stage) from node k to node k + 1
                ratio = t[k + 1] / t[k]
                log_scale[k + 1] = log_scale[k] - torch.log(ratio)
                dt[k] = -torch.log(ratio)            # h t' = secant * t / t'
                ds[k] = 1 / ratio - 1
            else:  # the midpoint stage of step (k - 1) / 2: DDIM from its start with the midpoint's output
                start, end = k - 1, k + 1
                ratio = t[end] / t[start]
                log_scale[end] = log_scale[start] - torch.log(ratio)
                s_m, s_b = log_scale[k].exp(), log_scale[end].exp()
                c = -(1 - ratio) * t[k] * s_b / s_m
                dt[k] = torch.log(c / secant[k])
                ds[k] = -c / t[k]
        log_scale[-1] = log_scale[-2]
        self.dt, self.ds, self.log_s = dt, ds, log_scale[1:]

    @property
    def order(self):
        return ORDER[self.base]

    @property
    def steps(self):
        return len(self.sigmas) - 1

    @property
    def nfe(self):
        """Model evaluations per image."""
        return _nfe(self.base, self.steps)

    def parameters(self):
        return [getattr(self, k) for k in self.NAMES]

    def detached(self):
        return Bespoke(self.base, self.sigmas, *[p.detach().clone() for p in self.parameters()])

    def tensors(self):
        """The free parameters as {name: tensor} (with the base schedule: what the calibration store keeps)."""
        return {"sigmas": self.sigmas, **{k: getattr(self, k).detach() for k in self.NAMES}}

    @classmethod
    def from_tensors(cls, base, tensors):
        t = {k: torch.as_tensor(v, dtype=torch.float64).cpu().reshape(-1) for k, v in tensors.items()}
        out = cls.identity(base, t["sigmas"])
        for k in cls.NAMES:
            want = getattr(out, k).shape
            if t[k].shape != want:
                raise ValueError(f"Stride Bespoke: parameter {k} has {t[k].numel()} values, a {base} solver of "
                                 f"{out.steps} steps has {want[0]}")
            if not bool(torch.isfinite(t[k]).all()):
                raise ValueError(f"Stride Bespoke: parameter {k} is not finite")
            setattr(out, k, t[k])
        return out

    def to_text(self):
        """One line of JSON (float64 values written with repr: read back bit for bit)."""
        return json.dumps({"stride_bespoke": TEXT_VERSION, "base": self.base,
                           **{k: [float(v) for v in t] for k, t in self.tensors().items()}})

    @classmethod
    def from_text(cls, text):
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"Stride Bespoke: the solver text is not valid JSON ({e})") from None
        if not isinstance(data, dict) or data.get("stride_bespoke") != TEXT_VERSION:
            raise ValueError("Stride Bespoke: not a Bespoke solver text of this version")
        return cls.from_tensors(data["base"], {k: data[k] for k in ("sigmas",) + cls.NAMES})

    # --- the scale-time transformation -------------------------------------------------------------------------

    def times(self):
        """The node times [S + 1] (float64): RK1 t_0 .. t_N; RK2 t_0, t_1/2, t_1, ..., t_{N-1}, t_N (= 0)."""
        base = self.sigmas[:-1]
        n = self.steps
        if n > 1:
            gaps = torch.log(base[:-1]) - torch.log(base[1:])                 # base gaps in log sigma
            shift = torch.cumsum(gaps * torch.expm1(self.gap.to(gaps)), 0)   # 0 exactly at identity
            inner = torch.cat([base[:1], base[1:] * torch.exp(shift)])
        else:
            inner = base
        if self.order == 1:
            return torch.cat([inner, inner.new_zeros(1)])
        w = torch.sigmoid(self.mid.to(inner))
        mids = torch.exp(torch.lerp(inner[:-1].log(), inner[1:].log(), w))
        nodes = torch.stack([inner[:-1], mids], 1).flatten()
        return torch.cat([nodes, inner[-1:], inner.new_zeros(1)])

    def coefficients(self):
        """(t [S+1], c [S], chi [S], s [S+1]): per stage its time, h t' (the secant times exp(dt)), h s'/s, and the
        scale at every node."""
        t = self.times()
        if self.order == 1:
            secant = t[1:] - t[:-1]
        else:  # first stage of step i: to its midpoint; midpoint stage: the whole step; last step: to 0
            k = len(t) - 2  # nodes 0, 1/2, 1, ..., N-1 at 0..k, sigma 0 at k + 1
            starts, mids, ends = t[0:k:2], t[1:k:2], t[2:k + 1:2]
            secant = torch.stack([mids - starts, ends - starts], 1).flatten()
            secant = torch.cat([secant, t[-1:] - t[-2:-1]])
        c = secant * torch.exp(self.dt.to(t))
        s = torch.cat([t.new_ones(1), torch.exp(self.log_s.to(t))])
        return t, c, self.ds.to(t), s

    def lipschitz(self, lip=0.0):
        """The Lipschitz bound of each step (the paper's L_i), with the slope's Lipschitz constant in x taken as
        lip / t (the PF-ODE slope (x - D)/sigma varies at most like 1/sigma). The default lip = 0 keeps only the
        scale terms: on the exact oracle, lip = 1 overweights the early (high-noise) steps, whose errors the ODE in
        fact contracts, and its fits lost to Euler on held-out EPS noises (3x and 59x worse at 4 and 8 steps), while
        lip = 0 won everywhere."""
        t, c, chi, s = self.coefficients()
        a = chi.abs() + c.abs() * lip / t[:-1]
        if self.order == 1:
            return s[:-1] / s[1:] * (1 + a)
        first, midst = a[:-1:2], a[1::2]
        inner = s[:-3:2] / s[2:-1:2] * (1 + midst * (1 + first))
        return torch.cat([inner, s[-2:-1] / s[-1:] * (1 + a[-1:])])


def _rk1(x, v, s_a, s_b, chi, c):
    return bcast(s_a / s_b, x) * (bcast(1 + chi, x) * x + bcast(c, x) * v)


def _rk2(x, x_m, v_m, s_a, s_m, s_b, chi_m, c_m):
    return (bcast(s_a, x) * x + bcast(s_m, x) * (bcast(chi_m, x) * x_m + bcast(c_m, x) * v_m)) / bcast(s_b, x)


def sample_bespoke(model, x, sigmas, extra_args=None, callback=None, disable=None, solver=None):
    """The Bespoke solver `solver` (a Bespoke) from x at sigmas[0]; `sigmas` must be its base schedule (the run's
    schedule, which calibration checks). Differentiable in x and in the solver's parameters."""
    extra_args = {} if extra_args is None else extra_args
    if solver is None or len(sigmas) != len(solver.sigmas):
        raise ValueError(f"Stride Bespoke: the solver was fitted for {None if solver is None else solver.steps} steps, "
                         f"this run has {len(sigmas) - 1}")
    t, c, chi, s = solver.coefficients()
    b = x.shape[0]
    sig = lambda k: t[k].to(x.device).expand(b).to(x.dtype)
    n = solver.steps
    for i in range(n):
        a = i if solver.order == 1 else 2 * i
        denoised = model(x, sig(a), **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        v = ode_slope(x, denoised, t[a])
        if solver.order == 1 or i == n - 1:
            x = _rk1(x, v, s[a], s[a + 1], chi[a], c[a])
            continue
        x_m = _rk1(x, v, s[a], s[a + 1], chi[a], c[a])
        v_m = ode_slope(x_m, model(x_m, sig(a + 1), **extra_args), t[a + 1])
        x = _rk2(x, x_m, v_m, s[a], s[a + 1], s[a + 2], chi[a + 1], c[a + 1])
    return x


def sample_bespoke_base(model, x, sigmas, extra_args=None, callback=None, disable=None, param=None, base="rk2"):
    """The base solver of a Bespoke solver (its identity parameters): Euler (rk1), ComfyUI's dpm_2 (rk2), DDIM (ei1)
    or DPM-Solver++(2S) (ei2) in the model's parameterization `param`."""
    flow = bool(getattr(param, "flow", False))
    return sample_bespoke(model, x, sigmas, extra_args, callback, disable, Bespoke.identity(base, sigmas, flow))


# --- the teacher ---------------------------------------------------------------------------------------------------

class Teacher:
    """A fine solve of the PF-ODE (Stride's UniPC-3 on `points` sigmas log-spaced in the half-log-SNR from the
    start to the floor, each interval cut in `refine`, then the final denoise), read at any time by cubic Hermite
    interpolation in sigma of its states and slopes; below the floor, the straight line to the output (the final
    denoise is the pack's reference convention)."""

    def __init__(self, denoiser, x, sigma_start, sigma_floor, flow, points=24, refine=2):
        self.grid = log_grid(float(sigma_start), float(sigma_floor), points, flow)
        xs, ds = teacher_trajectory(denoiser, x, self.grid, flow, refine)
        self.xs, self.output = xs[:-1].detach(), xs[-1].detach()
        self.vs = ode_slope(self.xs, ds.detach(), self.grid.to(xs).reshape(-1, *[1] * (xs.ndim - 1)))

    def rows(self, index):
        """The teacher of a subset of the batch."""
        out = Teacher.__new__(Teacher)
        out.grid, out.xs, out.vs, out.output = self.grid, self.xs[:, index], self.vs[:, index], self.output[index]
        return out

    def at(self, t):
        """The teacher state at the times t [K] (differentiable in t): [K, B, ...], on the teacher's device."""
        t = t.to(self.xs.device)
        grid = self.grid.to(t)
        idx = torch.searchsorted(-grid, -t.detach()).clamp(1, len(grid) - 1) - 1   # grid[idx] >= t > grid[idx+1]
        lo, hi = grid[idx], grid[idx + 1]
        h = hi - lo
        u = ((t - lo) / h).reshape(-1, *[1] * (self.xs.ndim - 1))
        h = h.reshape(u.shape)
        h00, h10, h01, h11 = 2 * u**3 - 3 * u**2 + 1, u**3 - 2 * u**2 + u, -2 * u**3 + 3 * u**2, u**3 - u**2
        inside = h00 * self.xs[idx] + h10 * h * self.vs[idx] + h01 * self.xs[idx + 1] + h11 * h * self.vs[idx + 1]
        floor = grid[-1]
        w = (t / floor).reshape(u.shape)
        below = self.output + w * (self.xs[-1] - self.output)
        return torch.where((t < floor).reshape(u.shape), below, inside)


# --- fitting ---------------------------------------------------------------------------------------------------------

def rmse_bound(solver, denoiser, teacher, lip=0.0):
    """The paper's loss per sample [B]: sum_i M_i d_i, d_i = RMSE(step_i(x(t_i)) - x(t_{i+1})) on the teacher, M_i
    the product of the Lipschitz bounds of the steps after i. All steps' evaluations go in one batched call (two
    for RK2)."""
    t, c, chi, s = (v.to(teacher.xs.device) for v in solver.coefficients())  # the parameters stay on the CPU
    n = solver.steps
    starts = t[:-1] if solver.order == 1 else t[:-1:2]
    stage = torch.arange(len(starts), device=t.device) * solver.order
    ends = torch.cat([starts[1:], t[-1:]])
    x0, x1 = teacher.at(starts), teacher.at(ends)                          # [N, B, ...]
    b = x0.shape[1]
    flat = lambda y: y.reshape(n * b, *y.shape[2:])
    per = lambda v: v.repeat_interleave(b)                                  # a per-step value for each row
    xs = flat(x0)
    v = ode_slope(xs, denoiser(xs, per(starts)), per(starts))
    a = stage
    if solver.order == 1:
        pred = _rk1(xs, v, per(s[a]), per(s[a + 1]), per(chi[a]), per(c[a]))
    else:
        rk1 = _rk1(xs, v, per(s[a]), per(s[a + 1]), per(chi[a]), per(c[a]))  # midpoints (and the last step)
        m = a[:-1] + 1
        x_m = rk1[: (n - 1) * b]
        v_m = ode_slope(x_m, denoiser(x_m, per(t[m])), per(t[m]))
        head = _rk2(xs[: (n - 1) * b], x_m, v_m, per(s[a[:-1]]), per(s[m]), per(s[m + 1]), per(chi[m]), per(c[m]))
        pred = torch.cat([head, rk1[(n - 1) * b:]])
    # [N, B]; the epsilon keeps the gradient finite where a step is exact (the last Euler step from the teacher's
    # floor is its final denoise)
    d = ((pred - flat(x1)).reshape(n, b, -1).pow(2).mean(-1) + 1e-24).sqrt()
    lips = solver.lipschitz(lip).to(d.device)
    later = torch.cat([torch.flip(torch.cumprod(torch.flip(lips[1:], [0]), 0), [0]), lips.new_ones(1)])  # M_i
    return (later[:, None] * d).sum(0)


def fit(denoiser, teacher, sigmas, base="rk2", iterations=200, lr=0.03, lip=0.0, init=None, progress=None,
        checkpointed=True, flow=False):
    """Fit a Bespoke solver on the teacher's noises by Adam on the RMSE bound; returns (the solver with the lowest
    bound met, its bound, the identity's bound). progress(i) is called after each iteration (and may raise to
    stop); it starts from `init`, else the base solver (flow: the model's parameterization, for the exponential
    integrators). denoiser(x, sigma [B]) is differentiable (gradients flow through it); checkpointed=False saves the
    recomputation where the denoiser is cheap and autograd-safe."""
    solver = (init or Bespoke.identity(base, sigmas, flow)).detached()
    if checkpointed:  # each model call's activations recomputed in the backward pass (as LD3)
        denoiser = checkpoint_calls(denoiser)
    params = [p.requires_grad_(True) for p in solver.parameters() if p.numel()]
    opt = torch.optim.Adam(params, lr=lr)
    best, start = None, None
    with torch.enable_grad():
        for i in range(iterations + 1):
            loss = rmse_bound(solver, denoiser, teacher, lip).mean()
            value = float(loss.detach())
            if not math.isfinite(value):
                break
            if start is None:
                start = value
            if best is None or value < best[1]:
                best = (solver.detached(), value)
            if i == iterations:
                break
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if progress is not None:
                progress(i + 1)
    if best is None:
        raise ValueError("Stride Bespoke: the model returned NaN/inf on the teacher trajectory")
    return best[0], best[1], start


def error(denoiser, solver, x, target):
    """Mean squared error per sample [B] of the solver's output from x against target (no gradients)."""
    with torch.no_grad():
        return mse(sample_bespoke(denoiser, x, solver.sigmas, solver=solver), target)


def calibrate(denoiser, x, sigmas, sigma_min, flow, base="rk2", iterations=200, lr=0.03, lip=0.0, points=24,
              refine=2, progress=None, stacked=False,
              checkpointed=True, teacher=None):
    """The whole Bespoke calibration: the teacher on every noise, the fit on the first half of the batch, and the
    judgement on the held-out rest. Returns (solver, report); raises ValueError, refusing the fit, when it is not
    better than its base on the held-out noises. report: errors (MSE against the teacher's output) on the fit and
    held-out noises, for the fitted solver and its base, and the bounds. denoiser(x, sigma [rows]) takes the batch, and its first k rows
    (the fit half) alone: a conditioned model conditions those as the batch's first k rows; stacked=True: it also
    takes any stack of copies of them, conditioned alike (then each fit iteration makes one call per stage).
    teacher: a Teacher of these noises to reuse (several schedules from the same first sigma share one)."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
    floor = min(float(sigma_min), float(sigmas[-2]))
    if teacher is None:
        teacher = Teacher(denoiser, x, float(sigmas[0]), floor, flow, points, refine)
    elif float(teacher.grid[0]) != float(sigmas[0]) or float(teacher.grid[-1]) > floor:
        raise ValueError("Stride Bespoke: the teacher given does not span this schedule (it must start at its first "
                         "sigma and reach its floor)")
    fit_rows, held_rows = held_out_split(x.shape[0], "Bespoke")
    fit_denoiser = denoiser if stacked else in_calls_of(denoiser, len(fit_rows))
    solver, bound, start = fit(fit_denoiser, teacher.rows(fit_rows), sigmas, base, iterations, lr, lip,
                               progress=progress, checkpointed=checkpointed, flow=flow)
    base_solver = Bespoke.identity(base, sigmas, flow)
    errs = {name: error(denoiser, sv, x.detach(), teacher.output) for name, sv in (("fitted", solver),
                                                                                  ("base", base_solver))}
    report = {"base": base, "nfe": solver.nfe, "bound": bound, "base_bound": start,
              "error": float(errs["fitted"][fit_rows].mean()), "base_error": float(errs["base"][fit_rows].mean()),
              "held_out_error": float(errs["fitted"][held_rows].mean()),
              "held_out_base_error": float(errs["base"][held_rows].mean())}
    check_held_out(report)
    return solver, report


class Refused(ValueError):
    """A fit that does not beat its base on the held-out noises; `report` holds the measured errors."""

    def __init__(self, message, report):
        super().__init__(message)
        self.report = report


def check_held_out(report):
    """Refuse a fit that does not beat its base on the held-out noises (issue 18: never store a losing fit)."""
    got, want = report["held_out_error"], report["held_out_base_error"]
    if not got < want:
        raise Refused(f"Stride Bespoke: the fitted {report['base']} solver is not better than its base on the "
                      f"held-out calibration noises (error {got:.4g} vs {want:.4g} for the base); it was refused and "
                      "nothing was stored. Try more iterations or samples, the other base, or another schedule", report)
