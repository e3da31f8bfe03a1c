"""Bespoke solvers (Shaul et al. 2024, arXiv:2310.19075): the scale-time transformation of Euler / midpoint.

Pure math on the exact oracle (the identity parameters are ComfyUI's euler and dpm_2 bit for bit, EPS and flow;
the teacher's Hermite reading; the text round trip; fitted solvers beat their base on held-out noises; a losing fit
is refused), then the nodes in the real ComfyUI."""
import json
import logging
import time

import pytest
import torch

import comfy.k_diffusion.sampling as kds
import comfy.sample
import comfy.samplers

LABELS = torch.tensor([0, 3, 5, 8])
RANGES = {False: (0.0292, 14.6), True: (0.01, 1.0)}


@pytest.fixture(scope="module")
def m(stride, guided_oracle):
    class Modules:
        guided = staticmethod(guided_oracle)
        bespoke = stride("samplers.bespoke")
        common = stride("samplers.schedules.common")
    return Modules


def noises(flow, seed, batch=8):
    x = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x if flow else x * RANGES[False][1]


def schedule(m, flow, steps):
    """karras (rho 7) on the EPS oracle's range; uniform in sigma from 1 (ComfyUI's simple, unshifted) on flow."""
    smin, smax = RANGES[flow]
    if flow:
        inner = torch.linspace(smax, smin, steps, dtype=torch.float64)
        return torch.cat([inner, inner.new_zeros(1)])
    return kds.get_sigmas_karras(steps, smin, smax).double()


@pytest.mark.parametrize("flow", [False, True])
@pytest.mark.parametrize("base,comfy_fn", [("rk1", kds.sample_euler), ("rk2", kds.sample_dpm_2)])
def test_identity_is_comfyui_euler_and_dpm_2_exactly(m, flow, base, comfy_fn):
    d, x, sigmas = m.guided(flow, LABELS), noises(flow, 0, 4), schedule(m, flow, 5)
    model = lambda x_, s_, **kw: d(x_, s_)
    want = comfy_fn(model, x.clone(), sigmas, disable=True)
    solver = m.bespoke.Bespoke.identity(base, sigmas)
    assert torch.equal(m.bespoke.sample_bespoke(model, x.clone(), sigmas, solver=solver), want)
    assert torch.equal(solver.times()[:-1:1 if base == "rk1" else 2], sigmas[:-1])
    solver.log_s = solver.log_s + 0.01
    assert not torch.equal(m.bespoke.sample_bespoke(model, x.clone(), sigmas, solver=solver), want)


def test_teacher_reads_its_grid_exactly_and_is_differentiable(m):
    d, x = m.guided(False, LABELS), noises(False, 0, 4)
    teacher = m.bespoke.Teacher(d, x, RANGES[False][1], RANGES[False][0], False)
    assert torch.equal(teacher.at(teacher.grid[[0, 5, 31]]), teacher.xs[[0, 5, 31]])
    assert torch.equal(teacher.at(torch.zeros(1, dtype=torch.float64))[0], teacher.output)
    t = torch.tensor([3.0], dtype=torch.float64, requires_grad=True)
    probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (slope,) = torch.autograd.grad((teacher.at(t)[0] * probe).sum(), t)
    # d x / d sigma of the interpolant is the ODE slope there, to the interpolation's accuracy
    here = teacher.at(t.detach())[0]
    want = (m.bespoke.ode_slope(here, d(here, 3.0), 3.0) * probe).sum()
    assert float(slope) == pytest.approx(float(want), rel=1e-2)


def perturbed(m, base, sigmas, seed=0):
    solver = m.bespoke.Bespoke.identity(base, sigmas)
    g = torch.Generator().manual_seed(seed)
    for name in solver.NAMES:
        setattr(solver, name, 0.1 * torch.randn(getattr(solver, name).shape, generator=g, dtype=torch.float64))
    return solver


@pytest.mark.parametrize("base", ["rk1", "rk2"])
def test_text_round_trip(m, base):
    d, x, sigmas = m.guided(True, LABELS), noises(True, 0, 4), schedule(m, True, 4)
    solver = perturbed(m, base, sigmas)
    again = m.bespoke.Bespoke.from_text(solver.to_text())
    run = lambda s: m.bespoke.sample_bespoke(d, x.clone(), sigmas, solver=s)
    assert torch.equal(run(again), run(solver))
    assert solver.nfe == (4 if base == "rk1" else 7) and len(solver.times()) == solver.nfe + 1
    data = json.loads(solver.to_text())
    data["dt"] = data["dt"][:-1]
    with pytest.raises(ValueError, match="parameter dt has"):
        m.bespoke.Bespoke.from_text(json.dumps(data))
    with pytest.raises(ValueError, match="not a Bespoke solver text"):
        m.bespoke.Bespoke.from_text('{"stride_schedule": 1}')
    with pytest.raises(ValueError, match="fitted for 4 steps, this run has 5"):
        run_5 = m.bespoke.sample_bespoke(d, x, schedule(m, True, 5), solver=solver)  # noqa: F841


# (flow, base, steps): the held-out error ratio to the base, measured (60 iterations, lr 0.05, 4 fit + 4 held-out
# noises of 4 digits, cfg 3): EPS rk1 @4 NFE 0.55, EPS rk2 @5 NFE 0.0003 (dpm_2 diverges on 3 karras steps, error
# 109), flow rk2 @7 NFE 0.035
GAINS = {(False, "rk1", 4): 0.75, (False, "rk2", 3): 0.01, (True, "rk2", 4): 0.1}


@pytest.mark.parametrize("flow,base,steps", list(GAINS))
def test_fitted_solver_beats_its_base_on_held_out_noises(m, flow, base, steps):
    d, x, sigmas = m.guided(flow, LABELS), noises(flow, 0, 8), schedule(m, flow, steps)
    solver, report = m.bespoke.calibrate(d, x, sigmas, RANGES[flow][0], flow, base, iterations=60, lr=0.05)
    print(report)
    assert report["bound"] < report["base_bound"] and report["error"] < report["base_error"]
    assert report["held_out_error"] < GAINS[(flow, base, steps)] * report["held_out_base_error"]
    t = solver.times()
    assert bool((t[1:] < t[:-1]).all()) and float(t[0]) == float(sigmas[0]) and float(t[-1]) == 0.0


def test_a_fit_no_better_than_its_base_is_refused(m):
    report = {"base": "rk1", "held_out_error": 0.2, "held_out_base_error": 0.1}
    with pytest.raises(m.bespoke.Refused, match="not better than its base on the held-out calibration noises"):
        m.bespoke.check_held_out(report)
    with pytest.raises(ValueError, match="at least 2 calibration noises"):
        m.bespoke.split(1)
