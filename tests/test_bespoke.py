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
import comfy.samplers
from test_calibrated import demo, sample

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


def ddim(d, x, sigmas, flow, order):
    """DDIM (order 1) / DPM-Solver++(2S) (order 2, midpoint in the half-log-SNR) written out, data prediction."""
    alpha = (lambda s_: 1 - s_) if flow else (lambda s_: 1.0)
    lam = (lambda s_: -torch.logit(s_.clamp(max=1 - 1e-4))) if flow else (lambda s_: -torch.log(s_))
    sigma_of = (lambda l_: torch.sigmoid(-l_)) if flow else (lambda l_: torch.exp(-l_))
    step = lambda x_, s, t, den: t / s * x_ + (alpha(t) - alpha(s) * t / s) * den
    for s, t in zip(sigmas[:-1], sigmas[1:]):
        den = d(x, s)
        if t == 0:
            x = den
        elif order == 1:
            x = step(x, s, t, den)
        else:
            mid = sigma_of((lam(s) + lam(t)) / 2)
            x = t / s * x + (alpha(t) - alpha(s) * t / s) * d(step(x, s, mid, den), mid)
    return x


@pytest.mark.parametrize("flow", [False, True])
@pytest.mark.parametrize("base,order", [("ei1", 1), ("ei2", 2)])
def test_exponential_identity_is_ddim_and_dpm_solver_2s(m, flow, base, order):
    d, x, sigmas = m.guided(flow, LABELS), noises(flow, 0, 4), schedule(m, flow, 5)
    solver = m.bespoke.Bespoke.identity(base, sigmas, flow)
    got = m.bespoke.sample_bespoke(lambda x_, s_: d(x_, s_), x.clone(), sigmas, solver=solver)
    assert torch.allclose(got, ddim(d, x.clone(), sigmas, flow, order), rtol=1e-9, atol=1e-9)


def test_teacher_reads_its_grid_exactly_and_is_differentiable(m):
    d, x = m.guided(False, LABELS), noises(False, 0, 4)
    teacher = m.bespoke.Teacher(d, x, RANGES[False][1], RANGES[False][0], False)
    assert torch.equal(teacher.at(teacher.grid[[0, 5, 23]]), teacher.xs[[0, 5, 23]])
    assert torch.equal(teacher.at(torch.zeros(1, dtype=torch.float64))[0], teacher.output)
    t = torch.tensor([3.0], dtype=torch.float64, requires_grad=True)
    probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (slope,) = torch.autograd.grad((teacher.at(t)[0] * probe).sum(), t)
    # d x / d sigma of the interpolant is the ODE slope there, to the interpolation's accuracy
    here = teacher.at(t.detach())[0]
    want = (m.bespoke.ode_slope(here, d(here, 3.0), 3.0) * probe).sum()
    assert float(slope) == pytest.approx(float(want), rel=1e-2)
    with pytest.raises(ValueError, match="does not span this schedule"):  # a teacher to share must fit the schedule
        m.bespoke.calibrate(d, x, schedule(m, False, 4)[1:], RANGES[False][0], False, teacher=teacher)


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
    for nfe in (4, 5, 8):  # the most steps within an NFE budget
        steps = m.bespoke.steps_for_nfe(base, nfe)
        assert m.bespoke.Bespoke.identity(base, schedule(m, True, steps)).nfe in (nfe - 1, nfe)
    data = json.loads(solver.to_text())
    data["dt"] = data["dt"][:-1]
    with pytest.raises(ValueError, match="parameter dt has"):
        m.bespoke.Bespoke.from_text(json.dumps(data))
    with pytest.raises(ValueError, match="not a Bespoke solver text"):
        m.bespoke.Bespoke.from_text('{"stride_schedule": 1}')
    with pytest.raises(ValueError, match="fitted for 4 steps, this run has 5"):
        m.bespoke.sample_bespoke(d, x, schedule(m, True, 5), solver=solver)


# (flow, base, steps): (calibration noises, half of them held out; iterations; bound on the held-out error ratio to
# the base). Measured at lr 0.05, cfg 3, 4 digits: EPS Euler 4 NFE 0.32 (16 noises; 0.80 with 8), EPS midpoint 5 NFE
# 0.0002 (dpm_2 diverges on 3 karras steps: error 109), flow midpoint 7 NFE 0.11 (0.04 after 60 iterations), flow
# DPM-Solver++(2S) 5 NFE 0.15
GAINS = {(False, "rk1", 4): (16, 40, 0.5), (False, "rk2", 3): (8, 30, 0.01), (True, "rk2", 4): (8, 30, 0.2),
         (True, "ei2", 3): (8, 40, 0.3)}


@pytest.mark.parametrize("flow,base,steps", list(GAINS))
def test_fitted_solver_beats_its_base_on_held_out_noises(m, flow, base, steps):
    batch, iterations, bound = GAINS[(flow, base, steps)]
    d, x, sigmas = m.guided(flow, LABELS), noises(flow, 0, batch), schedule(m, flow, steps)
    solver, report = m.bespoke.calibrate(d, x, sigmas, RANGES[flow][0], flow, base, iterations, lr=0.05, stacked=True,
                                         checkpointed=False)
    print(report)
    assert report["bound"] < report["base_bound"] and report["error"] < report["base_error"]
    assert report["held_out_error"] < bound * report["held_out_base_error"]
    t = solver.times()
    assert bool((t[1:] < t[:-1]).all()) and float(t[0]) == float(sigmas[0]) and float(t[-1]) == 0.0


def test_a_fit_no_better_than_its_base_is_refused(m):
    report = {"base": "rk1", "held_out_error": 0.2, "held_out_base_error": 0.1}
    with pytest.raises(m.bespoke.Refused, match="not better than its base on the held-out calibration noises"):
        m.bespoke.check_held_out(report)
    with pytest.raises(ValueError, match="at least 2 calibration noises"):
        m.common.held_out_split(1, "Bespoke")


# --- in the real ComfyUI --------------------------------------------------------------------------------------------

def calibrate(node_class, model, pos, neg, latent, scheduler, steps, base="rk1", iterations=25, samples=8, lr=0.05):
    with torch.inference_mode():
        return node_class("StrideCalibrateBespoke").execute(
            model, pos, neg, latent, 3.0, scheduler, steps, samples, 0, base, iterations, lr, 0.0).result[0]


def test_calibrate_store_widget_ksampler_name_and_refusals(stride, node_class, calibration_store, caplog):
    model, pos, neg, latent = demo(node_class, "oracle_eps")
    began = time.perf_counter()
    with caplog.at_level(logging.INFO):
        text = calibrate(node_class, model, pos, neg, latent, "karras", 4)
    seconds = time.perf_counter() - began
    data = json.loads(text)
    assert data["method"] == "bespoke" and data["options"]["base"] == "rk1" and len(data["values"]["dt"]) == 4
    assert any("calibration of about" in r.getMessage() for r in caplog.records)  # the estimate, before the work
    saved = list(calibration_store.glob("bespoke-*.safetensors"))
    assert len(saved) == 1
    info = stride("nodes.calibration_store").read(str(saved[0]))[1]["info"]
    assert info["held_out_error"] < info["held_out_base_error"]
    print(f"oracle_eps rk1 4 steps: {seconds:.1f} s, held-out {info['held_out_error']:.4g} vs base "
          f"{info['held_out_base_error']:.4g}, {info['evaluations']} evaluations")
    caplog.clear()
    with caplog.at_level(logging.INFO):  # the next run: from the store, no model run
        assert calibrate(node_class, model, pos, neg, latent, "karras", 4) == text
    assert any("reused" in r.getMessage() for r in caplog.records)

    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", 4)
    from_widget = sample(model, pos, neg, latent, node_class("StrideSamplerBespoke").execute(text).result[0], sigmas)
    base = sample(model, pos, neg, latent, comfy.samplers.sampler_object("euler"), sigmas)
    assert torch.isfinite(from_widget).all() and not torch.equal(from_widget, base)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        by_name = sample(model, pos, neg, latent, comfy.samplers.sampler_object("stride_bespoke"), sigmas)
    assert torch.equal(by_name, from_widget)
    assert any("using the stored calibration" in r.getMessage() for r in caplog.records)
    for f in calibration_store.glob("*.safetensors"):  # another machine: no store, the widget text still works
        f.unlink()
    sampler = node_class("StrideSamplerBespoke").execute(text).result[0]
    assert torch.equal(sample(model, pos, neg, latent, sampler, sigmas), from_widget)
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the KSampler name falls back to the midpoint base, and says why
        fallback = sample(model, pos, neg, latent, comfy.samplers.sampler_object("stride_bespoke"), sigmas)
    assert any("no calibration fits this run" in r.getMessage() for r in caplog.records)
    dpm_2 = sample(model, pos, neg, latent, comfy.samplers.sampler_object("dpm_2"), sigmas)
    assert torch.allclose(fallback, dpm_2, rtol=1e-5, atol=1e-5)  # float32: the midpoints' sigmas differ in rounding

    ms = model.get_model_object("model_sampling")
    with pytest.raises(ValueError, match="made for 4 steps, this run has 5"):
        sample(model, pos, neg, latent, sampler, comfy.samplers.calculate_sigmas(ms, "karras", 5))
    with pytest.raises(ValueError, match="another schedule"):
        sample(model, pos, neg, latent, sampler, comfy.samplers.calculate_sigmas(ms, "exponential", 4))
    with pytest.raises(ValueError, match="made at cfg 3.0, this run uses 5.0"):
        sample(model, pos, neg, latent, sampler, sigmas, cfg=5.0)
    with pytest.raises(ValueError, match="made for another model"):
        sample(demo(node_class, "unet_small")[0], pos, neg, latent, sampler, sigmas)
    with pytest.raises(ValueError, match="is a bespoke calibration, not iia"):
        node_class("StrideSamplerIIA").execute(text)


def test_a_losing_fit_is_refused_and_not_stored(node_class, calibration_store):
    model, pos, neg, latent = demo(node_class, "oracle_flow")
    with pytest.raises(ValueError, match="not better than its base on the held-out calibration noises"):
        calibrate(node_class, model, pos, neg, latent, "simple", 3, iterations=0, samples=4)  # the base itself
    assert not list(calibration_store.glob("*.safetensors"))


# (network, scheduler, base, iterations, learning rate)
TRAINED = [("unet_small", "karras", "rk1", 15, 0.03), ("dit_small", "simple", "rk2", 15, 0.01)]


@pytest.mark.parametrize("name,scheduler,base,iterations,lr", TRAINED)
def test_calibration_on_a_trained_network(node_class, calibration_store, name, scheduler, base, iterations, lr):
    """A tiny budget on the trained demo networks, gradients through ComfyUI's UNet and Flux-style DiT (whose blocks
    add in place into tensors autograd saved: each call is checkpointed)."""
    model, pos, neg, latent = demo(node_class, name)
    began = time.perf_counter()
    text = calibrate(node_class, model, pos, neg, latent, scheduler, 4, base=base, iterations=iterations,
                     samples=4, lr=lr)
    info = stride_info(calibration_store)
    print(f"{name} {base} 4 steps: {time.perf_counter() - began:.1f} s, held-out {info['held_out_error']:.4g} vs "
          f"base {info['held_out_base_error']:.4g}, {info['evaluations']} evaluations")
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, 4)
    out = sample(model, pos, neg, latent, node_class("StrideSamplerBespoke").execute(text).result[0], sigmas)
    assert torch.isfinite(out).all()


def stride_info(folder):
    from safetensors import safe_open
    (path,) = folder.glob("bespoke-*.safetensors")
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["stride"])["info"]


def test_calibration_is_interruptible_during_the_fit(stride, node_class, calibration_store, monkeypatch):
    import comfy.model_management as mm
    module = stride("samplers.bespoke")
    original, calls = module.rmse_bound, []

    def interrupting(*args, **kwargs):  # the user presses Cancel at the third iteration
        calls.append(1)
        if len(calls) == 3:
            mm.interrupt_current_processing(True)
        return original(*args, **kwargs)
    monkeypatch.setattr(module, "rmse_bound", interrupting)
    model, pos, neg, latent = demo(node_class, "oracle_flow")
    try:
        with pytest.raises(mm.InterruptProcessingException):
            calibrate(node_class, model, pos, neg, latent, "simple", 3, iterations=50, samples=4)
    finally:
        mm.interrupt_current_processing(False)
    assert len(calls) == 3 and not list(calibration_store.glob("*.safetensors"))
