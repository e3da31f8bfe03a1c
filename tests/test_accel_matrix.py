"""Stride's MODEL-patching accelerators (T-Stitch, step cache) across ComfyUI's sampling matrix: KSampler and
SamplerCustomAdvanced, batch > 1, cfg passes batched and split, size and batch changes between runs, split sigma
lists, Heun and a weight patch on top. Neutral settings (fraction 0, threshold 0) are the model bit for bit; active
ones finite, different and logged with the right counts."""
import logging
import re

import pytest
import torch

import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
from test_accel_comfy import demo, sample

FAMILIES = [("dit", "simple"), ("unet", "karras")]
NODES = ["StrideTStitch", "StrideStepCache"]
LOG = {"StrideTStitch": r"Stride T-Stitch: (\d+) of (\d+) model calls",
       "StrideStepCache": r"Stride step cache: (\d+) of (\d+) model calls"}
STEPS = 6


def accelerate(node_class, node, model, family, active):
    """The large model of `family` through `node`: neutral, or active (T-Stitch: small model for the first half;
    step cache: every other call reused, as the threshold is never reached and at most one reuse runs in a row)."""
    if node == "StrideTStitch":
        small = demo(node_class, f"{family}_small")[0]
        return node_class(node).execute(model=model, small_model=small, fraction=0.5 if active else 0.0).result[0]
    return node_class(node).execute(model=model, threshold=5.0 if active else 0.0, start=0.0, end=1.0,
                                    max_hits=1).result[0]


def logged(caplog, node):
    """[(hits or small-model calls, calls)] of every run logged by `node` so far."""
    return [tuple(map(int, m.groups())) for r in caplog.records if (m := re.match(LOG[node], r.getMessage()))]


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


@pytest.mark.parametrize("family,scheduler", FAMILIES)
@pytest.mark.parametrize("node", NODES)
def test_neutral_is_the_model_through_ksampler_and_custom_advanced(node_class, node, family, scheduler):
    """Fraction 0 / threshold 0 give the unpatched model bit for bit through both sampling paths."""
    model, pos, neg, latent = demo(node_class, f"{family}_large")
    x, neutral = latent["samples"], accelerate(node_class, node, model, family, False)
    assert torch.equal(ksampler(neutral, pos, neg, x, "dpmpp_2m", scheduler),
                       ksampler(model, pos, neg, x, "dpmpp_2m", scheduler))
    sigmas = sigmas_of(model, scheduler)
    assert torch.equal(advanced(neutral, pos, neg, x, sigmas), advanced(model, pos, neg, x, sigmas))


@pytest.mark.parametrize("node", NODES)
def test_active_is_finite_different_and_logged_through_both_paths(node_class, caplog, node):
    """Active settings change the result, and each run logs one entry per model call (counted by a wrapper)."""
    caplog.set_level(logging.INFO)
    model, pos, neg, latent = demo(node_class, "dit_large")
    x, sigmas = latent["samples"], sigmas_of(model, "simple")
    active, computed = counted(accelerate(node_class, node, model, "dit", True))  # counts the calls that run a model
    runs = [(ksampler(active, pos, neg, x), ksampler(model, pos, neg, x)),
            (advanced(active, pos, neg, x, sigmas), advanced(model, pos, neg, x, sigmas))]
    for out, plain in runs:
        assert torch.isfinite(out).all() and not torch.equal(out, plain)
    assert set(computed) == {(1, 0)}  # cfg batched: one call per step
    assert len(logged(caplog, node)) == 2
    for part, total in logged(caplog, node):
        assert total == STEPS
        if node == "StrideStepCache":
            assert part == STEPS // 2 and len(computed) == 2 * (STEPS - part)
        else:
            assert 0 < part < total and len(computed) == 2 * (total - part)  # the large model's calls


def test_batch_of_three_neutral_and_counted(node_class, caplog):
    """Batch 3: neutral settings are the model; an active cache logs exactly the model calls a wrapper counts."""
    caplog.set_level(logging.INFO)
    model, pos, neg, latent = demo(node_class, "unet_large", digits="370")
    x, sigmas = latent["samples"], sigmas_of(model, "karras")
    plain = advanced(model, pos, neg, x, sigmas)
    for node in NODES:
        assert torch.equal(advanced(accelerate(node_class, node, model, "unet", False), pos, neg, x, sigmas), plain)
    outer, calls = counted(model)  # added before the cache: counts every call, answered or not
    caplog.clear()
    out = advanced(accelerate(node_class, "StrideStepCache", outer, "unet", True), pos, neg, x, sigmas, "dpmpp_2m")
    assert torch.isfinite(out).all() and logged(caplog, "StrideStepCache") == [(STEPS // 2, len(calls))]
    assert len(calls) == STEPS


@pytest.mark.parametrize("node", NODES)
def test_identical_rows_stay_identical_when_active(node_class, node):
    """Batch 2 of one digit and one noise: both rows of the active result are equal (no row mixes state)."""
    model, pos, neg, latent = demo(node_class, "dit_large", digits="33")
    x, sigmas = latent["samples"], sigmas_of(model, "simple")
    noise = comfy.sample.prepare_noise(x[:1], 9).repeat(2, 1, 1, 1)
    out = advanced(accelerate(node_class, node, model, "dit", True), pos, neg, x, sigmas, "dpmpp_2m", noise=noise)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=1e-6)
    assert not torch.equal(out, advanced(model, pos, neg, x, sigmas, "dpmpp_2m", noise=noise))


def test_split_cfg_passes_keep_separate_cache_state(node_class, caplog, split_passes):
    """With cond and uncond in separate calls, threshold 0 is the model, and an active cache keeps one state per
    pass: twice the calls and hits of the batched run, and the same picture."""
    caplog.set_level(logging.INFO)
    model, pos, neg, latent = demo(node_class, "dit_large")
    x, sigmas = latent["samples"], sigmas_of(model, "simple")
    plain, calls = counted(model)
    reference = advanced(plain, pos, neg, x, sigmas)
    assert sorted(calls) == sorted([(0,), (1,)] * STEPS)  # really split
    neutral = accelerate(node_class, "StrideStepCache", model, "dit", False)
    assert torch.equal(advanced(neutral, pos, neg, x, sigmas), reference)
    active = accelerate(node_class, "StrideStepCache", model, "dit", True)
    caplog.clear()
    split = advanced(active, pos, neg, x, sigmas)
    assert logged(caplog, "StrideStepCache") == [(2 * (STEPS // 2), 2 * STEPS)]
    split_passes.undo()
    batched = advanced(active, pos, neg, x, sigmas)
    assert logged(caplog, "StrideStepCache")[-1] == (STEPS // 2, STEPS)
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
    (small, total), = logged(caplog, "StrideTStitch")
    assert torch.isfinite(out).all() and total == 2 * STEPS and 0 < small < total and small % 2 == 0


@pytest.mark.parametrize("node", NODES)
def test_resolution_and_batch_change_between_runs(node_class, node):
    """One active patched model: 8x8 batch 2, then 16x16 batch 3, then 8x8 batch 2 again equal to the first."""
    model, pos, neg, latent = demo(node_class, "dit_large")
    active, steps = accelerate(node_class, node, model, "dit", True), 5  # odd: a cache left over would reuse at once
    first = sample(active, pos, neg, latent, "dpmpp_2m", "simple", steps=steps)
    big = sample(active, pos, neg, {"samples": torch.zeros(3, 4, 16, 16)}, "dpmpp_2m", "simple", steps=steps)
    assert big.shape == (3, 4, 16, 16) and torch.isfinite(big).all()
    assert torch.equal(sample(active, pos, neg, latent, "dpmpp_2m", "simple", steps=steps), first)


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
    for a, b in zip(split(accelerate(node_class, node, model, "dit", False)), plain):
        assert torch.equal(a, b)
    active = accelerate(node_class, node, model, "dit", True)
    caplog.clear()
    mid, end = split(active)
    assert torch.isfinite(end).all() and not torch.equal(end, plain[1])
    assert [total for _, total in logged(caplog, node)] == [3, 5]
    fresh = accelerate(node_class, node, model, "dit", True)
    assert torch.equal(advanced(fresh, pos, neg, mid, low, "dpmpp_2m", noise=torch.zeros_like(x)), end)


@pytest.mark.parametrize("node", NODES)
def test_heun_two_calls_per_step(node_class, caplog, node):
    """Heun (two calls per step, one on the last): neutral is the model; active logs 2 * steps - 1 calls."""
    caplog.set_level(logging.INFO)
    model, pos, neg, latent = demo(node_class, "unet_large")
    x, plain = latent["samples"], ksampler(model, pos, neg, latent["samples"], "heun", "karras")
    neutral = accelerate(node_class, node, model, "unet", False)
    assert torch.equal(ksampler(neutral, pos, neg, x, "heun", "karras"), plain)
    caplog.clear()
    out = ksampler(accelerate(node_class, node, model, "unet", True), pos, neg, x, "heun", "karras")
    (part, total), = logged(caplog, node)
    assert torch.isfinite(out).all() and not torch.equal(out, plain) and total == 2 * STEPS - 1
    assert part == STEPS - 1 if node == "StrideStepCache" else 0 < part < total


@pytest.mark.parametrize("family,scheduler,key", [("dit", "simple", "diffusion_model.img_in.bias"),
                                                  ("unet", "karras", "diffusion_model.out.2.bias")])
@pytest.mark.parametrize("node", NODES)
def test_weight_patch_on_top(node_class, node, family, scheduler, key):
    """A weight patch added to the neutral patched model applies through the wrappers (for T-Stitch: to the
    large model): equal to the plain model with the same patch, and different from the unpatched model."""
    model, pos, neg, latent = demo(node_class, f"{family}_large")
    x = latent["samples"]
    delta = torch.full_like(model.model.state_dict()[key], 0.05)

    def with_patch(m):
        m = m.clone()
        assert m.add_patches({key: (delta,)}, 1.0) == [key]
        return m
    patched = ksampler(with_patch(accelerate(node_class, node, model, family, False)), pos, neg, x, "euler", scheduler)
    assert torch.equal(patched, ksampler(with_patch(model), pos, neg, x, "euler", scheduler))
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
