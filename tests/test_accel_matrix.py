"""Stride's MODEL-patching accelerators (T-Stitch, the step cache with either indicator, the calibrated cache plan)
across ComfyUI's sampling matrix: KSampler and SamplerCustomAdvanced, batch > 1, cfg passes batched and split, size
and batch changes between runs, split sigma lists, Heun and a weight patch on top. Neutral settings (fraction 0,
threshold 0, quantiles 0) are the model bit for bit; active ones finite, different and logged with the right
counts."""
import logging
import re

import pytest
import torch

import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
from test_accel_comfy import demo, sample

SCHEDULER = {"dit": "simple", "unet": "karras"}
FBC, PLAN = "StrideStepCache-first_block", "StrideCalibrateCachePlan"  # first block residual; calibrated plan
NODES = ["StrideTStitch", "StrideStepCache", FBC, PLAN]
PAIRS = [(node, family) for node in NODES for family in SCHEDULER if (node, family) != (FBC, "unet")]  # DiT only
LOG = {"StrideTStitch": "Stride T-Stitch", "StrideStepCache": "Stride step cache", FBC: "Stride step cache",
       PLAN: "Stride cache plan"}
STEPS = 6


@pytest.fixture(autouse=True)
def plans(calibration_store):
    """Plans are calibrated into a temporary store (a second calibration with the same settings reuses it)."""


def accelerate(node_class, node, model, family, active, run=(), sampler="euler", steps=STEPS):
    """The model of `family` through `node`: neutral, or active (T-Stitch: small model for the first half; step
    cache: every other call reuses, the whole call (input change) or all blocks but the first (first block
    residual), as the threshold is never reached and at most one reuse runs in a row; plan: quantiles 0.5).
    A plan is calibrated on run = (positive, negative, latent) at batch 1 for `sampler`, the family's scheduler
    and `steps` (the calibration logs a run of its own)."""
    if node == "StrideTStitch":
        small = demo(node_class, f"{family}_small")[0]
        return node_class(node).execute(model=model, small_model=small, fraction=0.5 if active else 0.0).result[0]
    if node == PLAN:
        q = 0.5 if active else 0.0
        with torch.inference_mode():
            return node_class(PLAN).execute(model, *run, sampler, SCHEDULER[family], steps, 3.0, 1, 5, q, q,
                                            0.1).result[0]
    return node_class("StrideStepCache").execute(model=model, threshold=5.0 if active else 0.0, start=0.0, end=1.0,
                                                 max_hits=1, indicator="first block residual" if node == FBC
                                                 else "input change").result[0]


def logged(caplog, node):
    """[(hits or small-model calls, calls, block evaluations reused)] of every run logged by `node` so far; every
    run of this matrix lines up with its plan (no calls outside it)."""
    runs = []
    for message in (r.getMessage() for r in caplog.records if r.getMessage().startswith(LOG[node] + ": ")):
        if m := re.match(r"[^:]+: (\d+) of (\d+) model calls", message):
            assert "not in the plan" not in message, message
            blocks = re.search(r"(\d+) of \d+ block evaluations reused", message)
            runs.append((int(m[1]), int(m[2]), int(blocks[1]) if blocks else 0))
    return runs


def other_blocks(model):
    """The blocks of a Flux-style DiT after the first: what a first-block-residual reuse skips in a call."""
    net = model.model.diffusion_model
    return len(net.double_blocks) + len(net.single_blocks) - 1


def assert_model(out, plain, node, family):
    """Neutral settings give the model: bit for bit, but to 1e-5 where the plan replaces a UNet's attention (it
    recomputes attention through ComfyUI's optimized_attention)."""
    if (node, family) == (PLAN, "unet"):
        torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(out, plain)


def counted(model):
    """(clone, calls): every apply_model call of the clone appends its cond_or_uncond chunk list to calls."""
    calls, clone = [], model.clone()

    def count(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        calls.append(tuple(transformer_options["cond_or_uncond"]))
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_count", count)
    return clone, calls


def ksampler(model, pos, neg, latent, sampler="euler", scheduler="simple", steps=STEPS, cfg=3.0):
    """ComfyUI's KSampler node path (comfy.sample.sample) on a latent tensor."""
    noise = comfy.sample.prepare_noise(latent, 9)
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, pos, neg, latent, denoise=1.0,
                                   disable_pbar=True, seed=9)


def advanced(model, pos, neg, latent, sigmas, sampler="euler", noise=None, cfg=3.0):
    """ComfyUI's SamplerCustomAdvanced path: a CFGGuider sampling `sigmas` (noise None = seeded noise)."""
    guider, noise = comfy.samplers.CFGGuider(model), comfy.sample.prepare_noise(latent, 9) if noise is None else noise
    guider.set_conds(pos, neg)
    guider.set_cfg(cfg)
    with torch.inference_mode():
        return guider.sample(noise, latent, comfy.samplers.sampler_object(sampler), sigmas, seed=9, disable_pbar=True)


def sigmas_of(model, scheduler, steps=STEPS):
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps)


@pytest.fixture
def split_passes(monkeypatch):
    """ComfyUI runs cond and uncond in one model call while model.memory_required * 1.5 < free memory
    (samplers._calc_cond_batch); with no free memory reported, every pass is its own call."""
    monkeypatch.setattr(comfy.model_management, "get_free_memory",
                        lambda dev=None, torch_free_too=False: (0, 0) if torch_free_too else 0)
    return monkeypatch


@pytest.mark.parametrize("node,family", PAIRS)
def test_neutral_is_the_model_through_ksampler_and_custom_advanced(node_class, node, family):
    """Fraction 0 / threshold 0 / quantiles 0 give the unpatched model through both sampling paths."""
    model, pos, neg, latent = demo(node_class, f"{family}_large")
    x, scheduler = latent["samples"], SCHEDULER[family]
    neutral = accelerate(node_class, node, model, family, False, (pos, neg, latent))
    assert_model(ksampler(neutral, pos, neg, x, "dpmpp_2m", scheduler),
                 ksampler(model, pos, neg, x, "dpmpp_2m", scheduler), node, family)
    sigmas = sigmas_of(model, scheduler)
    assert_model(advanced(neutral, pos, neg, x, sigmas), advanced(model, pos, neg, x, sigmas), node, family)


@pytest.mark.parametrize("node", NODES)
def test_active_is_finite_different_and_logged_through_both_paths(node_class, caplog, node):
    """Active settings change the result, and each run logs one entry per model call (counted by a wrapper)."""
    caplog.set_level(logging.INFO)
    model, pos, neg, latent = demo(node_class, "dit_large")
    x, sigmas = latent["samples"], sigmas_of(model, "simple")
    # counts the calls that run the (large) model
    active, computed = counted(accelerate(node_class, node, model, "dit", True, (pos, neg, latent)))
    caplog.clear()
    runs = [(ksampler(active, pos, neg, x), ksampler(model, pos, neg, x)),
            (advanced(active, pos, neg, x, sigmas), advanced(model, pos, neg, x, sigmas))]
    for out, plain in runs:
        assert torch.isfinite(out).all() and not torch.equal(out, plain)
    assert set(computed) == {(1, 0)}  # cfg batched: one call per step
    (part, total, blocks), second = logged(caplog, node)
    assert second == (part, total, blocks) and total == STEPS and len(computed) == 2 * (total - part)
    if node == "StrideStepCache":
        assert part == STEPS // 2 and blocks == 0
    elif node == FBC:
        assert part == 0 and blocks == STEPS // 2 * other_blocks(model)
    elif node == PLAN:
        assert part > 0 and blocks > 0
    else:
        assert 0 < part < total


def test_batch_of_three_neutral_and_counted(node_class, caplog):
    """Batch 3: neutral settings are the model; an active cache logs exactly the model calls a wrapper counts."""
    caplog.set_level(logging.INFO)
    model, pos, neg, latent = demo(node_class, "unet_large", digits="370")
    x, sigmas = latent["samples"], sigmas_of(model, "karras")
    plain = advanced(model, pos, neg, x, sigmas)
    for node in [n for n in NODES if n != FBC]:
        neutral = accelerate(node_class, node, model, "unet", False, (pos, neg, latent))
        assert_model(advanced(neutral, pos, neg, x, sigmas), plain, node, "unet")
    outer, calls = counted(model)  # added before the cache: counts every call, answered or not
    caplog.clear()
    out = advanced(accelerate(node_class, "StrideStepCache", outer, "unet", True), pos, neg, x, sigmas, "dpmpp_2m")
    assert torch.isfinite(out).all() and logged(caplog, "StrideStepCache") == [(STEPS // 2, len(calls), 0)]
    assert len(calls) == STEPS


@pytest.mark.parametrize("node", NODES)
def test_identical_rows_stay_identical_when_active(node_class, node):
    """Batch 2 of one digit and one noise: both rows of the active result are equal (no row mixes state)."""
    model, pos, neg, latent = demo(node_class, "dit_large", digits="33")
    x, sigmas = latent["samples"], sigmas_of(model, "simple")
    noise = comfy.sample.prepare_noise(x[:1], 9).repeat(2, 1, 1, 1)
    active = accelerate(node_class, node, model, "dit", True, (pos, neg, latent), "dpmpp_2m")
    out = advanced(active, pos, neg, x, sigmas, "dpmpp_2m", noise=noise)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=1e-6)
    assert not torch.equal(out, advanced(model, pos, neg, x, sigmas, "dpmpp_2m", noise=noise))


@pytest.mark.parametrize("node", NODES[1:])
def test_split_cfg_passes_keep_separate_cache_state(node_class, caplog, split_passes, node):
    """With cond and uncond in separate calls, neutral settings are the model, and an active cache keeps one state
    per pass: twice the calls, hits and reused blocks of the batched run, and the same picture."""
    caplog.set_level(logging.INFO)
    model, pos, neg, latent = demo(node_class, "dit_large")
    x, sigmas = latent["samples"], sigmas_of(model, "simple")
    plain, calls = counted(model)
    reference = advanced(plain, pos, neg, x, sigmas)
    assert sorted(calls) == sorted([(0,), (1,)] * STEPS)  # really split
    neutral = accelerate(node_class, node, model, "dit", False, (pos, neg, latent))
    assert torch.equal(advanced(neutral, pos, neg, x, sigmas), reference)
    active = accelerate(node_class, node, model, "dit", True, (pos, neg, latent))  # calibrated on split passes
    caplog.clear()
    split = advanced(active, pos, neg, x, sigmas)
    split_passes.undo()
    batched = advanced(active, pos, neg, x, sigmas)
    (part, total, blocks), = logged(caplog, node)[1:]
    assert logged(caplog, node)[0] == (2 * part, 2 * total, 2 * blocks) and total == STEPS and part + blocks > 0
    assert torch.isfinite(split).all() and not torch.equal(split, reference)
    torch.testing.assert_close(split, batched, rtol=1e-4, atol=1e-4)


def test_split_cfg_passes_stitch(node_class, caplog, split_passes):
    """With cond and uncond in separate calls, fraction 0 is the large model and every call is logged."""
    caplog.set_level(logging.INFO)
    model, pos, neg, latent = demo(node_class, "unet_large")
    x, sigmas = latent["samples"], sigmas_of(model, "karras")
    assert torch.equal(advanced(accelerate(node_class, "StrideTStitch", model, "unet", False), pos, neg, x, sigmas),
                       advanced(model, pos, neg, x, sigmas))
    caplog.clear()
    out = advanced(accelerate(node_class, "StrideTStitch", model, "unet", True), pos, neg, x, sigmas)
    (small, total, _), = logged(caplog, "StrideTStitch")
    assert torch.isfinite(out).all() and total == 2 * STEPS and 0 < small < total and small % 2 == 0


@pytest.mark.parametrize("node", NODES)
def test_resolution_and_batch_change_between_runs(node_class, caplog, node):
    """One active patched model (a plan calibrated at 8x8 batch 1): 8x8 batch 2, then 16x16 batch 3, then 8x8
    batch 2 again equal to the first; each run logged with the same counts."""
    caplog.set_level(logging.INFO)
    model, pos, neg, latent = demo(node_class, "dit_large")
    steps = 7  # odd: a cache left over would reuse at once
    active = accelerate(node_class, node, model, "dit", True, (pos, neg, latent), "dpmpp_2m", steps)
    caplog.clear()
    first = sample(active, pos, neg, latent, "dpmpp_2m", "simple", steps=steps)
    big = sample(active, pos, neg, {"samples": torch.zeros(3, 4, 16, 16)}, "dpmpp_2m", "simple", steps=steps)
    assert big.shape == (3, 4, 16, 16) and torch.isfinite(big).all()
    assert torch.equal(sample(active, pos, neg, latent, "dpmpp_2m", "simple", steps=steps), first)
    runs = logged(caplog, node)
    assert len(runs) == 3 and runs.count(runs[0]) == 3
    part, total, blocks = runs[0]
    assert total == steps and part + blocks > 0


@pytest.mark.parametrize("node", NODES)
def test_split_sigma_lists(node_class, caplog, node):
    """SplitSigmas halves (the second from zero noise): neutral is the plain model split the same way; active
    logs each run and starts the second from a clean state."""
    caplog.set_level(logging.INFO)
    model, pos, neg, latent = demo(node_class, "dit_large")
    x, sigmas = latent["samples"], sigmas_of(model, "simple", 8)
    high, low = sigmas[:4], sigmas[3:]

    def split(m, fresh=None):
        mid = advanced(m, pos, neg, x, high, "dpmpp_2m")
        return mid, advanced(fresh or m, pos, neg, mid, low, "dpmpp_2m", noise=torch.zeros_like(x))
    plain = split(model)
    plan_for = (pos, neg, latent), "dpmpp_2m", 8  # a plan is made for the whole schedule
    for a, b in zip(split(accelerate(node_class, node, model, "dit", False, *plan_for)), plain):
        assert torch.equal(a, b)
    active = accelerate(node_class, node, model, "dit", True, *plan_for)
    caplog.clear()
    mid, end = split(active)
    assert torch.isfinite(end).all() and not torch.equal(end, plain[1])
    assert [total for _, total, _ in logged(caplog, node)] == [3, 5]  # and both halves in the plan
    fresh = accelerate(node_class, node, model, "dit", True, *plan_for)  # a plan: the stored one
    assert torch.equal(advanced(fresh, pos, neg, mid, low, "dpmpp_2m", noise=torch.zeros_like(x)), end)


@pytest.mark.parametrize("node,family", [(node, "dit" if node == FBC else "unet") for node in NODES])
def test_heun_two_calls_per_step(node_class, caplog, node, family):
    """Heun (two calls per step, one on the last; a plan calibrated with heun): neutral is the model; active logs
    2 * steps - 1 calls, every other one reused by the step cache."""
    caplog.set_level(logging.INFO)
    model, pos, neg, latent = demo(node_class, f"{family}_large")
    x, scheduler = latent["samples"], SCHEDULER[family]
    plain = ksampler(model, pos, neg, x, "heun", scheduler)
    neutral = accelerate(node_class, node, model, family, False, (pos, neg, latent), "heun")
    assert_model(ksampler(neutral, pos, neg, x, "heun", scheduler), plain, node, family)
    active = accelerate(node_class, node, model, family, True, (pos, neg, latent), "heun")
    caplog.clear()
    out = ksampler(active, pos, neg, x, "heun", scheduler)
    (part, total, blocks), = logged(caplog, node)
    assert torch.isfinite(out).all() and not torch.equal(out, plain) and total == 2 * STEPS - 1
    if node == "StrideStepCache":
        assert part == STEPS - 1
    elif node == FBC:
        assert part == 0 and blocks == (STEPS - 1) * other_blocks(model)
    else:
        assert 0 < part < total


@pytest.mark.parametrize("node,family", PAIRS)
def test_weight_patch_on_top(node_class, node, family):
    """A weight patch added to the neutral patched model applies through the wrappers (for T-Stitch: to the
    large model): equal to the plain model with the same patch, and different from the unpatched model."""
    model, pos, neg, latent = demo(node_class, f"{family}_large")
    x, scheduler = latent["samples"], SCHEDULER[family]
    key = {"dit": "diffusion_model.img_in.bias", "unet": "diffusion_model.out.2.bias"}[family]
    delta = torch.full_like(model.model.state_dict()[key], 0.05)

    def with_patch(m):
        m = m.clone()
        assert m.add_patches({key: (delta,)}, 1.0) == [key]
        return m
    neutral = accelerate(node_class, node, model, family, False, (pos, neg, latent))
    patched = ksampler(with_patch(neutral), pos, neg, x, "euler", scheduler)
    assert_model(patched, ksampler(with_patch(model), pos, neg, x, "euler", scheduler), node, family)
    assert not torch.equal(patched, ksampler(model, pos, neg, x, "euler", scheduler))


def test_a_wrapper_before_the_stitch_leaves_the_small_calls_to_the_small_model(node_class):
    """ComfyUI's torch.compile wrapper (uncompiled module) on the large model before T-Stitch: fraction 1 is still
    the small model, and the wrapper sees each model call once."""
    from comfy_api.torch_helpers.torch_compile import COMPILE_KEY, apply_torch_compile_factory
    large, pos, neg, latent = demo(node_class, "dit_large")
    small = demo(node_class, "dit_small")[0]
    x, sigmas = latent["samples"], sigmas_of(large, "simple")
    compiled, calls = counted(large)
    wrapper = apply_torch_compile_factory({"diffusion_model": large.get_model_object("diffusion_model")})
    compiled.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, COMPILE_KEY, wrapper)
    stitched = node_class("StrideTStitch").execute(model=compiled, small_model=small, fraction=1.0).result[0]
    torch.testing.assert_close(advanced(stitched, pos, neg, x, sigmas), advanced(small, pos, neg, x, sigmas),
                               rtol=1e-6, atol=1e-6)
    assert len(calls) == STEPS
