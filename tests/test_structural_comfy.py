"""Structural accelerators in the real ComfyUI: ParaDiGMS through SamplerCustom on the exact EPS and flow oracles
and the trained DiT (cfg batched by ComfyUI across the window) with its per-run report; Bottleneck Sampling on the
trained DiT (the middle steps really run small); teleportation and ReDi calibrated, stored and sampled on EPS and
flow; and the refusals."""
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
    exact = node_class("StrideSamplerParaDiGMS").execute(8, 1e-5, 1).result[0]
    torch.testing.assert_close(sample(model, pos, neg, latent, exact, sigmas), euler, rtol=1e-3, atol=1e-3)
    two = sample(model, pos, neg, latent, node_class("StrideSamplerParaDiGMS").execute(8, 1e-5, 2).result[0], sigmas)
    torch.testing.assert_close(two, sample(model, pos, neg, latent, comfy.samplers.sampler_object("stride_dpmpp_2m"),
                                           sigmas), rtol=1e-3, atol=1e-3)
    with caplog.at_level(logging.INFO):
        fast = sample(model, pos, neg, latent, node_class("StrideSamplerParaDiGMS").execute(8, 0.1, 1).result[0],
                      sigmas)
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


@pytest.mark.parametrize("name,scheduler", [("dit_small", "simple"), ("unet_small", "karras")])
def test_bottleneck_runs_the_middle_small_and_returns_full_size(node_class, caplog, name, scheduler):
    model, pos, neg, latent = demo(node_class, name)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, 10)
    shapes = []
    counted = model.clone()
    counted.set_model_unet_function_wrapper(lambda apply, args: shapes.append(tuple(args["input"].shape[-2:]))
                                            or apply(args["input"], args["timestep"], **args["c"]))
    sampler = node_class("StrideSamplerBottleneck").execute(0.5, "0.2, 0.6, 0.2", "1.0, 0.8, 0.6", "1, 1, 1").result[0]
    with caplog.at_level(logging.INFO):
        out = sample(counted, pos, neg, latent, sampler, sigmas)
    assert out.shape == latent["samples"].shape and torch.isfinite(out).all()
    assert shapes.count((4, 4)) == 6 and shapes.count((8, 8)) == 4  # 2 + 6 + 2 steps
    assert any("Stride Bottleneck: stages of [2, 6, 2] steps" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="fractions needs 3 comma-separated numbers"):
        node_class("StrideSamplerBottleneck").execute(0.5, "0.5, 0.5", "1, 0.8, 0.6", "1, 1, 1")
    with pytest.raises(ValueError, match="Bottleneck: shifts must be comma-separated numbers"):
        node_class("StrideSamplerBottleneck").execute(0.5, "0.2, 0.6, 0.2", "1, 0.8, 0.6", "1, high, 1")
    odd = {"samples": torch.zeros(2, latent["samples"].shape[1], 6, 6)}
    with pytest.raises(ValueError, match="6x6"):
        sample(model, pos, neg, odd, node_class("StrideSamplerBottleneck").execute(0.5, "0.2, 0.6, 0.2",
                                                                                    "1, 0.8, 0.6", "1, 1, 1").result[0],
               sigmas)


@pytest.mark.parametrize("name,scheduler", [("oracle_eps", "karras"), ("oracle_flow", "simple")])
def test_teleportation_and_redi_calibrate_store_and_sample(node_class, calibration_store, caplog, name, scheduler):
    model, pos, neg, latent = demo(node_class, name, digits="33")
    ms = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, scheduler, 10)
    with torch.inference_mode():
        tele = node_class("StrideCalibrateTeleport").execute(model, pos, neg, latent, 3.0, 16, 0, rank=8).result[0]
        kb = node_class("StrideBuildReDi").execute(model, pos, neg, latent, 3.0, scheduler, 10, 16, 0, key_step=2,
                                                   value_step=4).result[0]
    with caplog.at_level(logging.INFO):
        out_t = sample(model, pos, neg, latent, node_class("StrideSamplerTeleport").execute(tele, skip=0.2).result[0],
                       sigmas)
        out_r = sample(model, pos, neg, latent, node_class("StrideSamplerReDi").execute(kb, neighbours=8).result[0],
                       sigmas)
    assert torch.isfinite(out_t).all() and torch.isfinite(out_r).all()
    messages = [r.getMessage() for r in caplog.records]
    assert any("the first 2 of 10 steps jumped in closed form" in msg for msg in messages)
    assert any("steps 2 to 4 retrieved from 16 stored trajectories" in msg for msg in messages)
    with pytest.raises(ValueError, match="made for 10 steps, this run has 8"):  # a knowledge base is schedule-bound
        sample(model, pos, neg, latent, node_class("StrideSamplerReDi").execute(kb, neighbours=8).result[0],
               comfy.samplers.calculate_sigmas(ms, scheduler, 8))
    with pytest.raises(ValueError, match="made at cfg 3.0, this run uses 5.0"):
        sample(model, pos, neg, latent, node_class("StrideSamplerTeleport").execute(tele, skip=0.2).result[0], sigmas,
               cfg=5.0)


def test_redi_node_options_act_and_a_small_base_is_warned(node_class, calibration_store, caplog):
    """residual off (ReDi's retrieved state alone) changes the output from the default carry; neighbours changes
    it; a base of 8 entries for a 256-value latent gets the build and the run warnings."""
    model, pos, neg, latent = demo(node_class, "oracle_eps", digits="33")
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", 10)
    with torch.inference_mode(), caplog.at_level(logging.WARNING):
        kb = node_class("StrideBuildReDi").execute(model, pos, neg, latent, 3.0, "karras", 10, 8, 0, key_step=2,
                                                   value_step=4).result[0]
    assert any("explain only" in r.getMessage() and "each other's state" in r.getMessage() for r in caplog.records)
    caplog.clear()
    redi = lambda **options: sample(model, pos, neg, latent,
                                    node_class("StrideSamplerReDi").execute(kb, **options).result[0], sigmas)
    with caplog.at_level(logging.WARNING):
        default = redi(neighbours=8)
    assert any("explains only" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        off = redi(neighbours=8, residual="off")
    assert any("residual to carry" in r.getMessage() for r in caplog.records)
    assert torch.equal(default, redi(neighbours=8, residual="carry")) and not torch.equal(default, off)
    assert not torch.equal(default, redi(neighbours=2))
    schema = node_class("StrideBuildReDi").define_schema()
    assert next(i for i in schema.inputs if i.id == "samples").default == 64
