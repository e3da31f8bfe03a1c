"""T-Stitch in the real ComfyUI: the small model takes the first part of the noise range, the large model the
rest, through KSampler and SamplerCustomAdvanced paths with single- and multistep samplers; fractions 0 and 1 are
the two models exactly; models of different families are refused with a clear message."""
import logging
import re

import pytest
import torch

import comfy.sample
import comfy.samplers


def demo(node_class, name, digits="37"):
    with torch.inference_mode():
        return node_class("StrideDemoModel").execute(name, digits, 1, 1.0, False).result


def sample(model, pos, neg, latent, sampler_name, scheduler, steps=10, cfg=3.0):
    ms = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, scheduler, steps)
    noise = comfy.sample.prepare_noise(latent["samples"], 9)
    with torch.inference_mode():
        return comfy.sample.sample_custom(model, noise, cfg, comfy.samplers.sampler_object(sampler_name), sigmas, pos,
                                          neg, latent["samples"], seed=9, disable_pbar=True)


@pytest.mark.parametrize("family,scheduler", [("unet", "karras"), ("dit", "simple")])
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_fractions_zero_and_one_are_the_two_models(node_class, family, scheduler, sampler):
    large, pos, neg, latent = demo(node_class, f"{family}_large")
    small = demo(node_class, f"{family}_small")[0]
    stitch = lambda f: node_class("StrideTStitch").execute(large, small, f).result[0]
    torch.testing.assert_close(sample(stitch(0.0), pos, neg, latent, sampler, scheduler),
                               sample(large, pos, neg, latent, sampler, scheduler), rtol=0, atol=0)
    torch.testing.assert_close(sample(stitch(1.0), pos, neg, latent, sampler, scheduler),
                               sample(small, pos, neg, latent, sampler, scheduler), rtol=1e-6, atol=1e-6)


def test_the_switch_follows_the_noise_range_and_is_logged(node_class, caplog):
    large, pos, neg, latent = demo(node_class, "dit_large")
    small = demo(node_class, "dit_small")[0]
    stitched = node_class("StrideTStitch").execute(large, small, 0.4).result[0]
    with caplog.at_level(logging.INFO):
        mixed = sample(stitched, pos, neg, latent, "dpmpp_2m", "simple", steps=10)
    report = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Stride T-Stitch"))
    small_calls, total = map(int, re.match(r"Stride T-Stitch: (\d+) of (\d+) model calls", report).groups())
    sigmas = comfy.samplers.calculate_sigmas(large.get_model_object("model_sampling"), "simple", 10)[:-1]
    assert total == 10 and small_calls == int((sigmas > 0.6).sum())  # flow: progress through the range is 1 - sigma
    assert 0 < small_calls < total
    assert torch.isfinite(mixed).all()
    assert not torch.equal(mixed, sample(large, pos, neg, latent, "dpmpp_2m", "simple", steps=10))


def test_models_of_different_families_are_refused(node_class):
    unet, dit = demo(node_class, "unet_large")[0], demo(node_class, "dit_small")[0]
    with pytest.raises(ValueError, match="cannot share a trajectory; they differ in parameterization"):
        node_class("StrideTStitch").execute(unet, dit, 0.4)
    with pytest.raises(ValueError, match="fraction must be in"):
        node_class("StrideTStitch").execute(unet, unet, 1.5)


def cache(node_class, model, threshold, start=0.0, end=1.0, max_hits=2):
    return node_class("StrideStepCache").execute(model, threshold, start, end, max_hits).result[0]


@pytest.mark.parametrize("name,scheduler", [("unet_small", "karras"), ("dit_small", "simple")])
def test_step_cache_off_is_the_model_and_on_reuses_with_a_cap(node_class, caplog, name, scheduler):
    model, pos, neg, latent = demo(node_class, name)
    plain = sample(model, pos, neg, latent, "euler", scheduler, steps=12)
    torch.testing.assert_close(sample(cache(node_class, model, 0.0), pos, neg, latent, "euler", scheduler, steps=12),
                               plain, rtol=0, atol=0)
    with caplog.at_level(logging.INFO):
        cached = sample(cache(node_class, model, 10.0, max_hits=1), pos, neg, latent, "euler", scheduler, steps=12)
    report = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Stride step cache"))
    hits, calls = map(int, re.match(r"Stride step cache: (\d+) of (\d+) model calls", report).groups())
    assert calls == 12 and hits == 6  # with a cap of 1 and a high threshold, every other call is reused
    assert torch.isfinite(cached).all() and not torch.equal(cached, plain)


def test_step_cache_resets_per_run_and_survives_a_new_size(node_class):
    model, pos, neg, latent = demo(node_class, "dit_small")
    cached = cache(node_class, model, 0.5)
    first = sample(cached, pos, neg, latent, "dpmpp_2m", "simple")
    assert torch.equal(sample(cached, pos, neg, latent, "dpmpp_2m", "simple"), first)  # nothing carried over
    big = {"samples": torch.zeros(2, latent["samples"].shape[1], 16, 16)}
    assert torch.isfinite(sample(cached, pos, neg, big, "dpmpp_2m", "simple")).all()
    with pytest.raises(ValueError, match="must not be after end"):
        node_class("StrideStepCache").execute(model, 0.1, 0.8, 0.2, 2)
