"""The calibrated cache plan (InvarDiff) and the first-block residual cache in the real ComfyUI: an empty plan is
the model exactly, a plan reuses blocks and calls at a small error and travels as text, calls the plan does not
know run in full (and are reported), split sigma lists and two-call-per-step samplers line up with the plan, the
stored plan is reused, and bad plans or models are refused with clear messages."""
import json
import logging
import re

import pytest
import torch

import comfy.samplers
from test_accel_comfy import demo, sample

SCHEDULER = {"dit": "simple", "unet": "karras"}


def calibrate(node_class, name, quantile=0.4, step_quantile=0.3, sampler="euler", steps=10):
    model, pos, neg, latent = demo(node_class, name)
    with torch.inference_mode():
        planned, text = node_class("StrideCalibrateCachePlan").execute(
            model, pos, neg, latent, sampler, SCHEDULER[name.split("_")[0]], steps, 3.0, 2, 5, quantile,
            step_quantile, 0.1).result
    return model, pos, neg, latent, planned, text


def report(caplog, prefix="Stride cache plan:"):
    message = [r.getMessage() for r in caplog.records if r.getMessage().startswith(prefix)][-1]
    hits, calls = map(int, re.search(r"(\d+) of (\d+) model calls", message).groups())
    blocks = re.search(r"(\d+) of (\d+) block evaluations", message)
    unmatched = re.search(r"(\d+) calls not in the plan", message)
    return hits, calls, tuple(map(int, blocks.groups())) if blocks else None, int(unmatched[1]) if unmatched else 0


@pytest.mark.parametrize("name", ["dit_small", "unet_small"])
def test_an_empty_plan_is_the_model_and_a_plan_reuses_at_a_small_error(node_class, calibration_store, caplog, name):
    """quantiles 0 cache nothing (the result is the model's); quantiles 0.5 reuse blocks and calls, near the model."""
    model, pos, neg, latent, planned, text = calibrate(node_class, name, 0.0, 0.0)
    scheduler = SCHEDULER[name.split("_")[0]]
    plain = sample(model, pos, neg, latent, "euler", scheduler)
    assert set("".join(json.loads(text)["cache"])) == {"0"}
    torch.testing.assert_close(sample(planned, pos, neg, latent, "euler", scheduler), plain, rtol=1e-5, atol=1e-5)
    planned = calibrate(node_class, name, 0.5, 0.5)[4]
    with caplog.at_level(logging.INFO):
        cached = sample(planned, pos, neg, latent, "euler", scheduler)
    hits, calls, blocks, unmatched = report(caplog)
    assert calls == 10 and hits >= 1 and blocks[0] > 0 and unmatched == 0
    assert 0 < ((cached - plain).norm() / plain.norm()) < 0.15


def test_the_plan_travels_as_text_and_is_stored(node_class, calibration_store, caplog):
    """The plan node applied to the text reproduces the calibrated model; a second calibration reuses the file."""
    model, pos, neg, latent, planned, text = calibrate(node_class, "dit_small", 0.5, 0.3)
    from_text = node_class("StrideCachePlan").execute(model, text).result[0]
    assert torch.equal(sample(from_text, pos, neg, latent, "euler", "simple"),
                       sample(planned, pos, neg, latent, "euler", "simple"))
    with caplog.at_level(logging.INFO):
        again = calibrate(node_class, "dit_small", 0.5, 0.3)[5]
    assert again == text and any("reused" in r.getMessage() for r in caplog.records)
    assert len(list(calibration_store.glob("cache_plan-*.safetensors"))) == 1


def test_plan_refusals(node_class, calibration_store):
    """Another model, broken or empty text, a schedule no sampler can follow, a model whose output is not finite:
    clear errors."""
    unet, pos, neg, latent = demo(node_class, "unet_small")
    calibrate_node = node_class("StrideCalibrateCachePlan")
    with pytest.raises(ValueError, match="sigmas must decrease strictly"):
        calibrate_node.execute(unet, pos, neg, latent, "euler", "karras", 6, 3.0, 1, 0, 0.4, 0.3, 0.1,
                               sigmas=torch.tensor([1.0, 2.0, 0.0]))
    broken = unet.clone()
    broken.set_model_unet_function_wrapper(lambda apply, args: apply(args["input"], args["timestep"], **args["c"])
                                           * float("nan"))
    with pytest.raises(ValueError, match="calibration noises is not finite"), torch.inference_mode():
        calibrate_node.execute(broken, pos, neg, latent, "euler", "karras", 6, 3.0, 1, 0, 0.4, 0.3, 0.1)
    text = calibrate(node_class, "dit_small", 0.3, 0.0, steps=6)[5]
    with pytest.raises(ValueError, match="made for model .* this model is"):
        node_class("StrideCachePlan").execute(unet, text)
    with pytest.raises(ValueError, match="no plan given"):
        node_class("StrideCachePlan").execute(unet, "  ")
    with pytest.raises(ValueError, match="not valid JSON"):
        node_class("StrideCachePlan").execute(unet, "{oops")
    with pytest.raises(ValueError, match="not a Stride cache plan"):
        node_class("StrideCachePlan").execute(unet, json.dumps({"stride_cache_plan": 99}))


def test_calls_outside_the_plan_run_in_full_and_split_sigmas_line_up(node_class, calibration_store, caplog):
    """Another schedule: nothing reused, the result is the model's, the log counts the unknown calls. The plan's own
    schedule split in two runs: both halves match the plan."""
    model, pos, neg, latent, planned, _ = calibrate(node_class, "dit_small", 0.5, 0.5)
    with caplog.at_level(logging.INFO):
        other = sample(planned, pos, neg, latent, "euler", "beta")
    hits, calls, blocks, unmatched = report(caplog)
    assert hits == 0 and blocks[0] == 0 and unmatched == calls == 10
    torch.testing.assert_close(other, sample(model, pos, neg, latent, "euler", "beta"), rtol=1e-5, atol=1e-5)

    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 10)
    guider = comfy.samplers.CFGGuider(planned)
    guider.set_conds(pos, neg)
    guider.set_cfg(3.0)
    noise = torch.randn(latent["samples"].shape, generator=torch.Generator().manual_seed(3))
    euler = comfy.samplers.sampler_object("euler")
    with torch.inference_mode(), caplog.at_level(logging.INFO):
        half = guider.sample(noise, latent["samples"], euler, sigmas[:6], seed=3, disable_pbar=True)
        first = report(caplog)
        guider.sample(torch.zeros_like(noise), half, euler, sigmas[5:], seed=3, disable_pbar=True)
        second = report(caplog)
    assert first[1] == second[1] == 5 and first[3] == second[3] == 0
    assert second[2][0] > 0  # the late half, where the plan caches most, reuses blocks


def test_heun_plan_matches_two_calls_per_step(node_class, calibration_store, caplog):
    """A plan calibrated with heun (two calls per step but the last) matches every call of a heun run."""
    model, pos, neg, latent, planned, text = calibrate(node_class, "dit_small", 0.5, 0.3, sampler="heun", steps=6)
    assert len(json.loads(text)["gate"]) == 11
    with caplog.at_level(logging.INFO):
        sample(planned, pos, neg, latent, "heun", "simple", steps=6)
    hits, calls, blocks, unmatched = report(caplog)
    assert calls == 11 and unmatched == 0 and hits + blocks[0] > 0


def test_first_block_cache(node_class, caplog):
    """Threshold 0 is the model; a threshold above the residual's change reuses the other blocks; a UNet is
    refused with a pointer to the input-change indicator."""
    model, pos, neg, latent = demo(node_class, "dit_small")
    fbc = lambda threshold: node_class("StrideStepCache").execute(
        model=model, threshold=threshold, start=0.0, end=1.0, max_hits=1, indicator="first block residual").result[0]
    plain = sample(model, pos, neg, latent, "euler", "simple")
    assert torch.equal(sample(fbc(0.0), pos, neg, latent, "euler", "simple"), plain)
    with caplog.at_level(logging.INFO):
        cached = sample(fbc(5.0), pos, neg, latent, "euler", "simple")
    hits, calls, blocks, _ = report(caplog, "Stride step cache:")
    assert hits == 0 and calls == 10 and blocks == (5 * 3, 4 * 10)  # calls 1, 3, 5, 7, 9 reuse 3 blocks each
    assert not torch.equal(cached, plain) and torch.isfinite(cached).all()
    with pytest.raises(ValueError, match="needs a DiT whose blocks .* is a UNet"):
        node_class("StrideStepCache").execute(model=demo(node_class, "unet_small")[0], threshold=0.1, start=0.0,
                                              end=1.0, max_hits=1, indicator="first block residual")


def test_a_family_whose_own_block_wrapper_fails_is_cached_by_whole_calls(stride, caplog):
    """A model whose own "dit" block wrapper cannot call its block (ComfyUI 0.33.0's Kandinsky5 passes x= to a block
    that takes visual_embed): the call reruns without Stride's block replacement, later calls are not replaced, and
    the first-block cache falls back to whole calls with the cause in the log."""
    from bench import families
    cache_mod, samplers_cache = stride("nodes.cache"), stride("samplers.cache")
    base = families.build("Flux dev").model.model
    seen = []

    class Executor:  # a model call as ComfyUI's apply_model makes it, with a wrapper that calls its block wrongly
        class_obj = base

        def __call__(self, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
            blocks = transformer_options.get("patches_replace", {}).get("dit", {})
            seen.append(("double_block", 0) in blocks)
            if seen[-1]:
                def wrapper(args):
                    raise TypeError("forward() got an unexpected keyword argument 'x'")
                return blocks[("double_block", 0)]({"x": x}, {"original_block": wrapper})["x"]
            return x * 0.5

    policy = cache_mod.AdaptivePolicy(samplers_cache.ReuseTest(5.0, 0.0, 1.0, 1, accumulate=False), "first_block")
    cache = cache_mod.Cache("step cache", [], policy, discover=True)
    run = cache.new_run({})
    options = {cache.runs.key: run, "cond_or_uncond": [0], "uuids": ["a"]}
    x, t = torch.ones(1, 16, 4, 4), torch.tensor([0.5])
    with caplog.at_level(logging.WARNING):
        outs = [cache.apply_model(Executor(), x, t, transformer_options=options) for _ in range(3)]
    # the failed call reran unreplaced, the second call was not replaced, the third answered whole (input unchanged)
    assert seen == [True, False, False]
    assert all(torch.allclose(out, x * 0.5) for out in outs)
    assert cache.broken.startswith("Flux's own")
    assert "own 'dit' block wrapper fails" in cache.broken and "TypeError" in cache.broken
    assert "whole calls are cached instead" in run.fallback and run.policy.indicator == "input"
    assert run.call_hits == 1
    assert any("runs without block replacement" in r.getMessage() for r in caplog.records)
