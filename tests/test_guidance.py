"""Guidance: CFG schedules of the noise level that really skip the unconditional pass, and RAAG.

Pure math first (the schedule formulas, the custom-curve parser, RAAG's per-sample scale), then the nodes in the real
ComfyUI on the exact EPS and flow oracles (batch 2, euler), counting the passes inside the model: KSampler and
SamplerCustomAdvanced, step-count changes and split sampling, the per-run log, RAAG against a hand-written Euler loop
on the exact denoiser, masked conditionings, guidance-distilled models, guiders other than plain CFG."""
import logging
import math
import re
from types import SimpleNamespace

import pytest
import torch

import comfy.sample
import comfy.samplers
from bench.reference import alpha_of, start_state

STEPS, CFG, SEED, DIGITS, LABELS = 10, 3.0, 5, "37", [3, 7]
SCHEDULER = {"oracle_eps": "karras", "oracle_flow": "simple"}
MODELS, ROUTES = list(SCHEDULER), ["KSampler", "SamplerCustomAdvanced"]
OPTIONS = {"start": 0.23, "end": 0.77, "floor": 1.0, "points": "0:1, 0.25:6, 1:6", "points_in": "progress"}


@pytest.fixture(scope="module")
def g(stride):
    return stride("samplers.guidance")


# --- pure math ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [3.0, 7.5])
def test_schedule_formulas(g, cfg):
    p = torch.linspace(0, 1, 20001, dtype=torch.float64)
    scale = lambda kind, **kw: torch.tensor([g.scheduled_scale(kind, q, cfg, **kw) for q in p.tolist()])
    for kind in ("constant", "linear", "cosine"):  # the ramps keep the constant's mean over the noise range
        assert torch.trapezoid(scale(kind), p).item() == pytest.approx(cfg, abs=1e-6)
    assert [g.scheduled_scale("linear", q, cfg) for q in (0, 0.25, 1)] == pytest.approx([1, (cfg + 1) / 2, 2 * cfg - 1])
    assert [g.scheduled_scale("cosine", q, cfg) for q in (0, 0.25, 0.5, 1)] == pytest.approx(
        [1, 1 + (cfg - 1) * (1 - math.sqrt(0.5)), cfg, 2 * cfg - 1])
    clamp = scale("clamp_linear", floor=2.0)
    assert clamp.min() == 2.0 and clamp[0] == 2.0 and clamp[-1] == pytest.approx(2 * cfg - 1)
    assert torch.equal(clamp, torch.maximum(scale("linear"), torch.tensor(2.0, dtype=torch.float64)))
    inside = (p >= 0.2) & (p <= 0.6)
    assert torch.equal(scale("interval", start=0.2, end=0.6), torch.where(inside, cfg, 1.0).double())
    assert g.scheduled_scale("interval", 0.2, cfg, 0.2, 0.6) == cfg == g.scheduled_scale("interval", 0.6, cfg, 0.2, 0.6)
    with pytest.raises(ValueError, match="unknown schedule 'ramp'"):
        g.scheduled_scale("ramp", 0.5, cfg)


def test_parse_points_and_interpolate(g):
    points = g.parse_points(" 0.8:4; 0.2:2, 0.6:6 ,")
    assert points == [(0.2, 2.0), (0.6, 6.0), (0.8, 4.0)]
    at = [g.interpolate(points, p) for p in (-1, 0, 0.2, 0.4, 0.7, 0.8, 1, 5)]
    assert at == pytest.approx([2, 2, 2, 4, 5, 4, 4, 4])  # constant beyond the ends
    assert [g.interpolate([(0.5, 3.0)], p) for p in (0, 0.5, 1)] == [3.0, 3.0, 3.0]


def test_custom_points_can_use_the_base_cfg(g, node_class, caplog):
    """A custom scale may be 'cfg': the guider's cfg (or the sampler's) then shapes the curve; a curve of fixed
    scales leaves the guider's cfg unused, and the guider says so."""
    points = g.parse_points("0:1, 0.5:cfg, 1:2")
    assert [g.scheduled_scale("custom", p, 7.0, points=points) for p in (0, 0.25, 0.5, 1)] == [1.0, 4.0, 7.0, 2.0]
    assert g.scheduled_scale("custom", 0.5, 3.0, points=points) == 3.0
    m, pos, neg, _ = demo(node_class, "oracle_eps")
    with caplog.at_level(logging.WARNING):
        node_class("StrideCFGScheduleGuider").execute(m, pos, neg, 4.0, "custom", 0.2, 0.8, 1.0, "0:1, 1:6",
                                                      "progress")
    assert any("guider's cfg (4) is not used" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        node_class("StrideCFGScheduleGuider").execute(m, pos, neg, 4.0, "custom", 0.2, 0.8, 1.0, "0:1, 1:cfg",
                                                      "progress")
    assert not any("is not used" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("text,words", [
    ("abc", "point 'abc' is not 'position:scale'"), ("1:", "point '1:' is not 'position:scale'"),
    ("0:1, 1:2:3", "'1:2:3' is not 'position:scale'"), ("", "needs at least one 'position:scale' point"),
    (" , ;", "needs at least one"), ("0:1, 0.5:-2", "'0.5:-2' needs finite values and a scale >= 0"),
    ("0:nan", "needs finite values")])
def test_bad_points_are_clear_errors(g, text, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        g.parse_points(text)


def test_raag_scale_per_sample(g):
    uncond = torch.tensor([[0.0, 10.0], [1.0, 0.0]]).view(2, 2, 1, 1)
    cond = torch.tensor([[3.0, 4.0], [0.1, 0.0]]).view(2, 2, 1, 1)
    ratio = [(3 ** 2 + 6 ** 2) / 10 ** 2, 0.81]  # the paper's RATIO |cond - uncond|^2 / |uncond|^2, by hand
    w = g.raag_scale(cond, uncond, 5.0, 2.0)
    assert w.shape == (2,) and w.tolist() == pytest.approx([1 + 4 * math.exp(-2 * r) for r in ratio], rel=1e-6)
    assert w.tolist() != pytest.approx([1 + 4 * math.exp(-2 * math.sqrt(r)) for r in ratio], rel=1e-3)  # not unsquared
    direction = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    base = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ws = torch.stack([g.raag_scale(base + t * direction, base, 7.0, 8.0) for t in (1e-9, 1e-2, 1e-1, 1.0, 1e3)])
    assert torch.allclose(ws[0], torch.tensor(7.0), atol=1e-5) and torch.allclose(ws[-1], torch.tensor(1.0))
    assert (ws[1:] < ws[:-1]).all()  # decreasing in rho, from w_max to 1


def test_guide_per_sample(g):
    cond, uncond = torch.randn(2, 2, 4, 8, 8, generator=torch.Generator().manual_seed(2)).double()
    out = g.guide(cond, uncond, torch.tensor([1.0, 4.0]))
    assert out.dtype == torch.float64 and torch.allclose(out[0], cond[0], rtol=0, atol=1e-12)
    assert torch.allclose(out[1], uncond[1] + 4 * (cond[1] - uncond[1]), rtol=0, atol=1e-12)
    assert torch.allclose(g.guide(cond, uncond, 2.5), uncond + 2.5 * (cond - uncond), rtol=0, atol=1e-12)


# --- real ComfyUI, counting the passes inside the model -------------------------------------------------------------

def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def demo(node_class, model, shift=1.0):
    """(MODEL, positive, negative, LATENT) of the demo loader: digits 3 and 7, batch 2."""
    return node_class("StrideDemoModel").execute(model, DIGITS, 1, shift, False).result


def ksampler(node_class, model, pos, neg, latent, scheduler, steps=STEPS, cfg=CFG):
    return node_class("KSampler")().sample(model, SEED, steps, cfg, "euler", scheduler, pos, neg, latent)[0]["samples"]


def advanced(node_class, guider, sigmas, latent, noise=True):
    noise = node_class("RandomNoise").execute(SEED) if noise else node_class("DisableNoise").execute()
    return node_class("SamplerCustomAdvanced").execute(noise.result[0], guider, comfy.samplers.sampler_object("euler"),
                                                       sigmas, latent).result[0]


def run(stride, node_class, name, route, kind=None, steps=STEPS, shift=1.0, positive=None, **options):
    """One euler run with the schedule `kind` (None: plain CFG): its samples x, the cond and uncond passes counted in
    the model, the sigmas, the model_sampling ms and the progress p of each step's sigma (computed here)."""
    model, pos, neg, latent = demo(node_class, name, shift)
    pos = positive or pos
    model, counter = stride("nodes.counting").count_model_calls(model)
    ms = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, SCHEDULER[name], steps)
    options = {**OPTIONS, **options}
    if route == "KSampler":
        if kind:
            model = node_class("StrideCFGSchedule").execute(model, kind, **options).result[0]
        x = ksampler(node_class, model, pos, neg, latent, SCHEDULER[name], steps)
    else:
        guider = (node_class("StrideCFGScheduleGuider").execute(model, pos, neg, CFG, kind, **options) if kind
                  else node_class("CFGGuider").execute(model, pos, neg, CFG)).result[0]
        x = advanced(node_class, guider, sigmas, latent)["samples"]
    t = ms.timestep(sigmas[:-1]).double()  # progress: 0 at sigma_max, 1 at sigma = 0
    p = 1 - t / ms.timestep(ms.sigma_max.reshape(1)).double()
    return SimpleNamespace(x=x, cond=counter.cond, uncond=counter.uncond, sigmas=sigmas, ms=ms, p=p)


def inside(p):
    return int(((p >= OPTIONS["start"]) & (p <= OPTIONS["end"])).sum())


def euler(stride, ms, sigmas, w_of):
    """A hand-written Euler run on the exact oracle (float64) from the seed's noise, guided by
    D_u + w (D_c - D_u) with w = w_of(step, x - D_c, x - D_u) (a scalar or one per sample)."""
    mixture, alpha = stride("nodes.oracle_model").load_mixture(), alpha_of(ms)
    labels = torch.tensor(LABELS)
    x = start_state(ms, float(sigmas[0]), comfy.sample.prepare_noise(torch.zeros(2, 4, 8, 8), SEED))
    for i, (s, s_next) in enumerate(zip(sigmas[:-1].tolist(), sigmas[1:].tolist())):
        c = x - mixture.denoise(x, s, alpha(s), labels)
        u = x - mixture.denoise(x, s, alpha(s), torch.full_like(labels, -1))
        w = torch.as_tensor(w_of(i, c, u), dtype=x.dtype).reshape(-1, 1, 1, 1)
        x = x + (u + w * (c - u)) / s * (s_next - s)
    return x


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("route", ROUTES)
def test_constant_schedule_is_plain_cfg(stride, node_class, route, model):
    a, b = run(stride, node_class, model, route, "constant"), run(stride, node_class, model, route)
    assert torch.equal(a.x, b.x) and (a.cond, a.uncond) == (b.cond, b.uncond) == (STEPS, STEPS)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("route", ROUTES)
def test_interval_skips_the_uncond_pass_outside_and_guides_inside(stride, node_class, route, model):
    r = run(stride, node_class, model, route, "interval")
    guided = (r.p >= OPTIONS["start"]) & (r.p <= OPTIONS["end"])
    assert 0 < inside(r.p) < STEPS and (r.cond, r.uncond) == (STEPS, inside(r.p))
    assert rel(r.x, euler(stride, r.ms, r.sigmas, lambda i, c, u: CFG if guided[i] else 1.0)) < 1e-4
    assert rel(r.x, euler(stride, r.ms, r.sigmas, lambda i, c, u: CFG)) > 1e-2  # not plain CFG


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("kind,options,skipped", [
    ("linear", {}, lambda p, s: p == 0),  # the ramp starts at 1: only the first step (sigma_max) skips
    ("clamp_linear", {"floor": 2.0}, lambda p, s: p < 0),  # never 1: nothing skipped
    ("custom", {"points": "0:1, 0.45:1, 0.55:5, 1:5"}, lambda p, s: p <= 0.45),  # a flat 1 region
    ("custom", {"points": "0:4, 0.45:4, 0.55:1, 100:1", "points_in": "sigma"}, lambda p, s: s >= 0.55)])
def test_schedules_skip_where_the_scale_is_one(stride, node_class, model, kind, options, skipped):
    r = run(stride, node_class, model, "KSampler", kind, **options)
    expected = STEPS - int(skipped(r.p, r.sigmas[:-1].double()).sum())
    assert (r.cond, r.uncond) == (STEPS, expected) and (kind == "clamp_linear" or expected < STEPS)


def test_the_schedule_follows_the_noise_level_not_the_step_index(stride, node_class):
    """Flow with shift 3: the steps crowd at high noise, so the step index and the noise level disagree. With 10 and
    20 steps the guided steps are exactly those whose sigma lies in the same band (progress = 1 - sigma for flow)."""
    band = {"start": 0.45, "end": 0.95}
    for steps in (10, 20):
        r = run(stride, node_class, "oracle_flow", "KSampler", "interval", steps, 3.0, **band)
        s, index = r.sigmas[:-1].double(), torch.arange(steps) / steps
        in_band = int(((s >= 1 - band["end"]) & (s <= 1 - band["start"])).sum())
        by_index = int(((index >= band["start"]) & (index <= band["end"])).sum())
        assert (r.cond, r.uncond) == (steps, in_band) and 0 < in_band < by_index


@pytest.mark.parametrize("model", MODELS)
def test_split_sampling_equals_the_unsplit_run(stride, node_class, model):
    """SplitSigmas into two SamplerCustomAdvanced with the schedule guider: the same passes skipped, and (euler keeps
    no history) the same result up to float32 rounding of the latent handed between the nodes."""
    m, pos, neg, latent = demo(node_class, model)
    m, counter = stride("nodes.counting").count_model_calls(m)
    sigmas = comfy.samplers.calculate_sigmas(m.get_model_object("model_sampling"), SCHEDULER[model], STEPS)
    guider = lambda: node_class("StrideCFGScheduleGuider").execute(m, pos, neg, CFG, "interval", **OPTIONS).result[0]
    whole = advanced(node_class, guider(), sigmas, latent)["samples"]
    passes = (counter.cond, counter.uncond)
    counter.reset()
    high, low = node_class("SplitSigmas").execute(sigmas, 4).result
    split = advanced(node_class, guider(), low, advanced(node_class, guider(), high, latent), noise=False)["samples"]
    assert (counter.cond, counter.uncond) == passes and 0 < passes[1] < STEPS
    assert rel(split, whole) < 1e-5


def test_each_run_logs_its_skipped_passes_and_speedup(run_prompt, caplog):
    """Through the prompt executor: one patched flow model, two KSamplers (simple, 10 and 20 steps, progress
    = 1 - sigma = i / steps); each run logs its own numbers (the counts reset between runs)."""
    prompt = {"m": {"class_type": "StrideDemoModel", "inputs": {"model": "oracle_flow", "digits": DIGITS, "repeats": 1,
                                                                "shift": 1.0, "zero_terminal_snr": False}},
              "cs": {"class_type": "StrideCFGSchedule", "inputs": {"model": ["m", 0], "schedule": "interval", **OPTIONS}}}
    for steps in (10, 20):
        prompt[f"ks{steps}"] = {"class_type": "KSampler", "inputs": {
            "model": ["cs", 0], "positive": ["m", 1], "negative": ["m", 2], "latent_image": ["m", 3], "seed": SEED,
            "steps": steps, "cfg": CFG, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}
        prompt[f"cap{steps}"] = {"class_type": "StrideTestCapture", "inputs": {"key": str(steps),
                                                                              "latent": [f"ks{steps}", 0]}}
    with caplog.at_level(logging.INFO):
        assert set(run_prompt(prompt)[1]) == {"10", "20"}
    pattern = (r"Stride CFG schedule \(interval\): unconditional pass skipped in (\d+) of (\d+) denoiser calls; (\d+) "
               r"model evaluations instead of (\d+) \(x([\d.]+)\)")
    logged = [re.fullmatch(pattern, r.getMessage()) for r in caplog.records if "Stride CFG schedule" in r.getMessage()]
    # guided where 0.23 <= i / steps <= 0.77: 5 of 10 steps (i = 3..7) and 11 of 20 (i = 5..15)
    assert sorted(m.groups() for m in logged) == [("5", "10", "15", "20", "1.33"), ("9", "20", "31", "40", "1.29")]


RAAG_ALPHA = {"oracle_eps": 200.0, "oracle_flow": 20.0}  # where the squared RATIO of each model matters


@pytest.mark.parametrize("model", MODELS)
def test_raag_in_ksampler(stride, node_class, model):
    """StrideRAAG with cfg 1 in KSampler: the uncond pass is still computed at every step, and the result is a
    hand-written Euler run with w = 1 + (w_max - 1) exp(-alpha RATIO) per sample (not one RATIO for the batch,
    and with the paper's squared norms);
    alpha = 0 is plain CFG at w_max, a huge alpha the conditional prediction alone (plain cfg 1)."""
    m, pos, neg, latent = demo(node_class, model)
    m, counter = stride("nodes.counting").count_model_calls(m)
    ms = m.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, SCHEDULER[model], STEPS)
    ks = lambda patched, cfg=1.0: ksampler(node_class, patched, pos, neg, latent, SCHEDULER[model], cfg=cfg)
    alpha = RAAG_ALPHA[model]
    x = ks(node_class("StrideRAAG").execute(m, 4.0, alpha).result[0])
    assert (counter.cond, counter.uncond) == (STEPS, STEPS)
    norm = lambda v: v.flatten(1).norm(dim=1)
    ratio = lambda c, u: (norm(c - u) / norm(u)) ** 2
    scale = lambda r: 1 + 3 * torch.exp(-alpha * r)
    assert rel(x, euler(stride, ms, sigmas, lambda i, c, u: scale(ratio(c, u)))) < 1e-5
    assert rel(x, euler(stride, ms, sigmas, lambda i, c, u: scale(((c - u).norm() / u.norm()) ** 2))) > 1e-3
    assert rel(x, euler(stride, ms, sigmas, lambda i, c, u: scale(ratio(c, u) ** 0.5))) > 1e-3  # not unsquared
    x_max, x_one = ks(node_class("StrideRAAG").execute(m, 4.0, 0.0).result[0]), ks(
        stride("nodes.guidance").raag_patch(m, 4.0, 1e12))
    assert rel(x_max, ks(m, cfg=4.0)) < 1e-5 and rel(x_one, ks(m, cfg=1.0)) < 1e-5 and rel(x_one, x_max) > 1e-2


def test_raag_keeps_an_existing_cfg_function_and_refuses_a_cfg_schedule(stride, node_class):
    """RescaleCFG before RAAG runs with RAAG's per-image scale as its cond_scale: at alpha 0 (scale w_max
    throughout) the pair is RescaleCFG at cfg w_max exactly. A Stride CFG schedule and RAAG on one model (either
    order) would leave the schedule without effect: refused, as is RAAG twice."""
    m, pos, neg, latent = demo(node_class, "oracle_eps")
    ks = lambda patched, cfg=1.0: ksampler(node_class, patched, pos, neg, latent, "karras", cfg=cfg)
    rescaled = node_class("RescaleCFG")().patch(m, 0.7)[0]
    raag = lambda model, alpha: node_class("StrideRAAG").execute(model, 4.0, alpha).result[0]
    both = ks(raag(rescaled, 0.0))
    assert rel(both, ks(rescaled, cfg=4.0)) < 1e-5 and rel(both, ks(raag(m, 0.0))) > 1e-3
    assert rel(ks(raag(rescaled, 200.0)), both) > 1e-3 and rel(ks(raag(rescaled, 200.0)), ks(raag(m, 200.0))) > 1e-3
    scheduled = node_class("StrideCFGSchedule").execute(m, "interval", **OPTIONS).result[0]
    with pytest.raises(ValueError, match="carries a Stride CFG schedule"):
        raag(scheduled, 8.0)
    with pytest.raises(ValueError, match="guided by RAAG, which sets its own scale"):
        node_class("StrideCFGSchedule").execute(raag(m, 8.0), "interval", **OPTIONS)
    with pytest.raises(ValueError, match="already guided by RAAG"):
        raag(raag(m, 8.0), 8.0)


@pytest.mark.parametrize("route", ROUTES)
def test_several_masked_positive_conditionings(stride, node_class, route):
    """Two positive conditionings on complementary masks, combined (the oracle model cannot take area conditioning:
    ComfyUI crops the latent to the area, and the oracle only knows 8x8 latents)."""
    digits, left = stride("nodes.oracle_model").digit_conditioning, torch.zeros(1, 8, 8)
    left[..., :4] = 1.0
    mask = lambda cond, m: node_class("ConditioningSetMask")().append(cond, m, "default", 1.0)[0]
    positive = node_class("ConditioningCombine")().combine(mask(digits(LABELS), left), mask(digits([7, 3]), 1 - left))[0]
    a, b = (run(stride, node_class, "oracle_eps", route, kind, positive=positive) for kind in ("constant", None))
    assert torch.equal(a.x, b.x) and (a.cond, a.uncond) == (b.cond, b.uncond) == (STEPS, STEPS)
    assert rel(a.x, run(stride, node_class, "oracle_eps", route).x) > 1e-2  # the masks matter
    r = run(stride, node_class, "oracle_eps", route, "interval", positive=positive)
    assert (r.cond, r.uncond) == (STEPS, inside(r.p)) and 0 < inside(r.p) < STEPS


def test_guidance_distilled_models_get_a_warning(node_class, oracle_model, caplog):
    plain, distilled = oracle_model("flow"), oracle_model("flow")
    distilled.model.model_config.unet_config["guidance_embed"] = True  # as Flux-dev's config says
    for model in (plain, distilled):
        with caplog.at_level(logging.WARNING):
            node_class("StrideCFGSchedule").execute(model, "interval", **OPTIONS)
            node_class("StrideRAAG").execute(model, 4.0, 8.0)
        messages = [r.getMessage() for r in caplog.records if "guidance-distilled" in r.getMessage()]
        caplog.clear()
        if model is plain:
            assert messages == []
        else:
            assert len(messages) == 2 and all("FluxGuidance" in m and "cfg 1" in m for m in messages)
            assert messages[0].startswith("Stride CFG schedule:") and messages[1].startswith("Stride RAAG:")


def test_dual_cfg_guider_is_left_alone_with_a_warning(stride, node_class, caplog):
    m, pos, neg, latent = demo(node_class, "oracle_eps")
    m, counter = stride("nodes.counting").count_model_calls(m)
    sigmas = comfy.samplers.calculate_sigmas(m.get_model_object("model_sampling"), "karras", STEPS)
    middle = stride("nodes.oracle_model").digit_conditioning([7, 3])
    dual = lambda model: node_class("DualCFGGuider").execute(model, pos, middle, neg, CFG, 2.0, "regular").result[0]
    patched = node_class("StrideCFGSchedule").execute(m, "interval", **OPTIONS).result[0]
    with caplog.at_level(logging.WARNING):
        x = advanced(node_class, dual(patched), sigmas, latent)["samples"]
    passes = (counter.cond, counter.uncond)
    counter.reset()
    assert torch.equal(x, advanced(node_class, dual(m), sigmas, latent)["samples"])
    assert passes == (counter.cond, counter.uncond) == (STEPS, STEPS)
    assert any(r.levelno == logging.WARNING and "Guider_DualCFG is not plain CFG" in r.getMessage()
               for r in caplog.records)


def test_basic_guider_is_left_alone(stride, node_class, caplog):
    m, pos, neg, latent = demo(node_class, "oracle_eps")
    sigmas = comfy.samplers.calculate_sigmas(m.get_model_object("model_sampling"), "karras", STEPS)
    patched = node_class("StrideCFGSchedule").execute(m, "custom", **{**OPTIONS, "points": "0:6, 1:6"}).result[0]
    with caplog.at_level(logging.WARNING):
        x = advanced(node_class, node_class("BasicGuider").execute(patched, pos).result[0], sigmas, latent)["samples"]
    x0 = advanced(node_class, node_class("BasicGuider").execute(m, pos).result[0], sigmas, latent)["samples"]
    assert any("not plain CFG" in r.getMessage() for r in caplog.records) and rel(x, x0) < 1e-6


@pytest.mark.parametrize("other", ["CFGZeroStar", "APG"])
def test_schedule_composes_with_core_guidance_patches(stride, node_class, other):
    """A core CFG patch on top of the schedule (CFGZeroStar post-CFG, APG pre-CFG): the interval still skips the
    unconditional pass outside [start, end], and with a constant schedule the pair equals the core patch alone."""
    model, pos, neg, latent = demo(node_class, "oracle_flow")
    options = {"eta": 1.0, "norm_threshold": 5.0, "momentum": 0.0} if other == "APG" else {}
    with_other = lambda m: node_class(other).execute(m, **options).result[0]
    alone = ksampler(node_class, with_other(model), pos, neg, latent, "simple")
    counted, counter = stride("nodes.counting").count_model_calls(model)
    const = node_class("StrideCFGSchedule").execute(counted, "constant", **OPTIONS).result[0]
    assert torch.equal(ksampler(node_class, with_other(const), pos, neg, latent, "simple"), alone)
    counter.reset()
    interval = node_class("StrideCFGSchedule").execute(counted, "interval", **OPTIONS).result[0]
    x = ksampler(node_class, with_other(interval), pos, neg, latent, "simple")
    expected = run(stride, node_class, "oracle_flow", "KSampler", "interval")
    assert (counter.cond, counter.uncond) == (STEPS, expected.uncond) and expected.uncond < STEPS
    assert bool(torch.isfinite(x).all()) and rel(x, alone) > 1e-3


def test_progress_spans_the_noise_range_of_continuous_edm_models(stride):
    """ComfyUI's continuous EDM / V model samplings use timestep = 0.25 log(sigma), negative below sigma 1: progress
    falls back to log sigma between sigma_min and sigma_max, so it stays inside (0, 1) below sigma 1 too."""
    import comfy.model_sampling
    ms = comfy.model_sampling.ModelSamplingContinuousEDM()
    ms.set_parameters(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5)
    progress = stride("nodes.guidance").progress
    values = [progress(ms, torch.tensor(s)) for s in (80.0, 20.0, 1.0, 0.5, 0.002)]
    assert values[0] == 0.0 and values[-1] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(values, values[1:]))
    assert values[2] == pytest.approx(math.log(80 / 1.0) / math.log(80 / 0.002), rel=1e-6)
