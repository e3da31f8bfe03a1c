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
