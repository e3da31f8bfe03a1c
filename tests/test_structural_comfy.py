"""Structural accelerators in the real ComfyUI: ParaDiGMS through SamplerCustom on the exact EPS and flow oracles
and the trained DiT (cfg batched by ComfyUI across the window), its per-run report, and its refusals."""
import logging
import re

import pytest
import torch

import comfy.sample
import comfy.samplers


def demo(node_class, name, digits="37"):
    with torch.inference_mode():
        return node_class("StrideDemoModel").execute(name, digits, 1, 1.0, False).result


def sample(model, pos, neg, latent, sampler, sigmas, cfg=3.0, mask=None):
    noise = comfy.sample.prepare_noise(latent["samples"], 5)
    with torch.inference_mode():
        return comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, pos, neg, latent["samples"], seed=5,
                                          noise_mask=mask, disable_pbar=True)


@pytest.mark.parametrize("name,scheduler", [("oracle_eps", "karras"), ("oracle_flow", "simple"),
                                            ("dit_small", "simple")])
def test_paradigms_matches_sequential_euler_in_fewer_rounds(node_class, caplog, name, scheduler):
    model, pos, neg, latent = demo(node_class, name)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, 20)
    euler = sample(model, pos, neg, latent, comfy.samplers.sampler_object("euler"), sigmas)
    exact = node_class("StrideSamplerParaDiGMS").execute(8, 1e-5).result[0]
    torch.testing.assert_close(sample(model, pos, neg, latent, exact, sigmas), euler, rtol=1e-3, atol=1e-3)
    with caplog.at_level(logging.INFO):
        fast = sample(model, pos, neg, latent, node_class("StrideSamplerParaDiGMS").execute(8, 0.1).result[0], sigmas)
    report = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Stride ParaDiGMS"))
    steps, rounds, evaluations = map(int, re.match(r"Stride ParaDiGMS: (\d+) steps in (\d+) sequential rounds .* "
                                                   r"with (\d+) model evaluations", report).groups())
    assert steps == 20 and rounds < steps <= evaluations
    rel = (fast - euler).norm() / euler.norm()
    assert rel < 0.05


def test_paradigms_refuses_inpainting_masks(node_class):
    model, pos, neg, latent = demo(node_class, "oracle_eps")
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", 6)
    mask = torch.ones(1, 1, 8, 8)
    with pytest.raises(ValueError, match="inpainting masks"):
        sample(model, pos, neg, latent, node_class("StrideSamplerParaDiGMS").execute(4, 0.1).result[0], sigmas,
               mask=mask)
