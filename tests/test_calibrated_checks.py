"""Calibrate nodes in the real ComfyUI, for what an outside review found: a schedule that starts below the model's
sigma_max is calibrated from that start (a split schedule's tail, or an image latent at denoise < 1), a model
that returns NaN gets a clear refusal and nothing stored, and options that only shape the calibration warn when
they cannot mean what they say."""
import json
import logging

import pytest
import torch

import comfy.sample
import comfy.samplers


@pytest.fixture
def store(calibration_store):
    return calibration_store


def demo(node_class, name, batch=8):
    with torch.inference_mode():
        model, pos, neg, latent = node_class("StrideDemoModel").execute(name, "0123456789", 1, 1.0, False).result
    return model, pos, neg, {"samples": latent["samples"].repeat(batch, 1, 1, 1)}


def run(model, pos, neg, latent, sampler, sigmas, noise_seed=None, cfg=3.0):
    """sample_custom; noise_seed None: no noise added (the latent is already the state at sigmas[0])."""
    samples = latent["samples"]
    noise = torch.zeros_like(samples) if noise_seed is None else comfy.sample.prepare_noise(samples, noise_seed)
    with torch.inference_mode():
        return comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, pos, neg, samples, seed=0,
                                          disable_pbar=True)


def reference_sampler(stride):
    return comfy.samplers.KSAMPLER(stride("samplers.reference").sample_reference, {"rtol": 1e-6, "atol": 1e-6})


def rmse(a, b):
    return float((a.double() - b.double()).pow(2).mean().sqrt())


@pytest.mark.parametrize("method", ["iia", "dc_solver"])
def test_a_schedule_tail_is_calibrated_from_its_own_start(stride, node_class, store, caplog, method):
    """The last 6 of 10 karras sigmas (a split schedule): the calibration noises are carried down to the tail's
    first sigma, so on held-out noises (carried there by the reference) the calibrated sampler beats its base.
    Calibrated from sigma_max instead (the old behaviour), IIA came out worse than its base here."""
    model, pos, neg, latent = demo(node_class, "oracle_eps")
    ms = model.get_model_object("model_sampling")
    full = comfy.samplers.calculate_sigmas(ms, "karras", 10)
    tail = full[4:]
    node, sampler_node, options, base = {
        "iia": ("StrideCalibrateIIA", "StrideSamplerIIA", {"base": "dpmpp_2m", "target": "reference"},
                (stride("samplers.multistep").sample_dpmpp, {"order": 2})),
        "dc_solver": ("StrideCalibrateDCSolver", "StrideSamplerDCSolver", {"solver": "unipc"},
                      (stride("samplers.multistep").sample_unipc, {"order": 2, "variant": "bh2"}))}[method]
    with torch.inference_mode(), caplog.at_level(logging.INFO):
        text = node_class(node).execute(model, pos, neg, latent, 3.0, "karras", 6, 8, 0, sigmas=tail,
                                        **options).result[0]
    assert any("carried down to it" in r.getMessage() for r in caplog.records)
    held = {"samples": run(model, pos, neg, latent, reference_sampler(stride), full[:5], noise_seed=7)}
    want = run(model, pos, neg, held, reference_sampler(stride), tail)
    calibrated = run(model, pos, neg, held, node_class(sampler_node).execute(text).result[0], tail)
    plain = run(model, pos, neg, held, comfy.samplers.KSAMPLER(*base), tail)
    assert rmse(calibrated, want) < 0.9 * rmse(plain, want)


def test_an_image_latent_is_calibrated_noised_to_the_schedule_start(stride, node_class, store, caplog):
    """denoise < 1 on an image latent: the calibration starts from the latent noised to the schedule's first sigma,
    by the model's own noise scaling (as the user's img2img run does)."""
    model, pos, neg, latent = demo(node_class, "oracle_eps", batch=4)
    image = {"samples": torch.randn(latent["samples"].shape, generator=torch.Generator().manual_seed(3))}
    tail = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", 10)[4:]
    with torch.inference_mode(), caplog.at_level(logging.INFO):
        text = node_class("StrideCalibrateDCSolver").execute(model, pos, neg, image, 3.0, "karras", 6, 4, 0,
                                                             sigmas=tail, solver="unipc").result[0]
    assert any("noised to it" in r.getMessage() for r in caplog.records)
    assert len(json.loads(text)["values"]) == 6


NAN_CASES = {"StrideCalibrateDCSolver": {"solver": "unipc"},
             "StrideCalibrateIIA": {"base": "dpmpp_2m", "target": "reference"},
             "StrideCalibrateDPMSolverV3": {"statistics": "per_channel"},
             "StrideCalibrateTeleport": {"rank": 2}}


@pytest.mark.parametrize("node", list(NAN_CASES))
def test_a_model_that_returns_nan_is_refused_and_nothing_stored(node_class, store, node):
    """Before: DC-Solver stored ratios of 1 with error NaN, DPM-Solver-v3 NaN statistics, teleportation died in
    a raw SVD error."""
    model, pos, neg, latent = demo(node_class, "oracle_eps", batch=4)
    broken = model.clone()
    broken.set_model_sampler_post_cfg_function(lambda args: args["denoised"] * float("nan"))
    with torch.inference_mode(), pytest.raises(ValueError, match="returned NaN or inf .* nothing was stored"):
        schedule = () if node == "StrideCalibrateTeleport" else ("karras", 5)  # its statistics take no schedule
        node_class(node).execute(broken, pos, neg, latent, 3.0, *schedule, 4, 0, **NAN_CASES[node])
    assert not list(store.glob("*.safetensors"))


def test_capped_options_warn(node_class, store, caplog):
    """Teleportation's rank is capped at samples - 1 (rank 16 with 4 samples is 3 directions), and DPM-Solver-v3's
    per-element statistics from 2 samples (the fit half of 4) are 99% per channel: both say so, and the stored calibration tells."""
    model, pos, neg, latent = demo(node_class, "oracle_eps", batch=4)
    with torch.inference_mode(), caplog.at_level(logging.WARNING):
        text = node_class("StrideCalibrateTeleport").execute(model, pos, neg, latent, 3.0, 4, 0, rank=16).result[0]
    assert any("rank 16 needs at least 17 samples; 4 samples give only 3" in r.getMessage() for r in caplog.records)
    assert len(json.loads(text)["values"]["lam"]) == 3
    caplog.clear()
    with torch.inference_mode(), caplog.at_level(logging.WARNING):
        node_class("StrideCalibrateTeleport").execute(model, pos, neg, latent, 3.0, 4, 0, rank=3)
        node_class("StrideCalibrateDPMSolverV3").execute(model, pos, neg, latent, 3.0, "karras", 6, 4, 0,
                                                         statistics="per_channel")
    assert not any("needs at least" in r.getMessage() or "per element and" in r.getMessage() for r in caplog.records)
    with torch.inference_mode(), caplog.at_level(logging.WARNING):
        node_class("StrideCalibrateDPMSolverV3").execute(model, pos, neg, latent, 3.0, "karras", 6, 4, 0,
                                                         statistics="per_element")
    assert any("from 2 samples (the fit half) are 1% per element and 99% per channel" in r.getMessage() for r in caplog.records)


def test_small_items(stride, node_class, store, caplog, guided_oracle):
    """sample_dc runs with its default parameterization (it crashed on param=None); the CPR node's list errors
    name it; a CPR calibration warns when a run extrapolates outside its searched steps and cfg."""
    dc = stride("samplers.calibrated.dc_solver")
    d = guided_oracle(False, torch.tensor([3, 7]), 3.0)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 14.6
    sigmas = torch.tensor([14.6, 3.0, 0.7, 0.1, 0.0], dtype=torch.float64)
    assert torch.isfinite(dc.sample_dc(d, x, sigmas, ratios=[1.0, 1.0, 1.1, 1.0])).all()
    model, pos, neg, latent = demo(node_class, "oracle_eps", batch=2)
    cpr = lambda steps, cfgs: node_class("StrideCalibrateDCSolverCPR").execute(model, pos, neg, latent, "karras", 2,
                                                                                0, steps, cfgs, "unipc").result[0]
    with pytest.raises(ValueError, match="Stride DC-Solver CPR: list at least one value in steps_list"):
        cpr(" , ", "3")
    with pytest.raises(ValueError, match="Stride DC-Solver CPR: steps_list must be whole numbers of at least 3"):
        cpr("2, 4", "3")
    with torch.inference_mode():
        text = cpr("4, 5", "2, 3")
    assert json.loads(text)["options"]["steps"] == [4, 5] and json.loads(text)["options"]["cfgs"] == [2.0, 3.0]
    sampler = node_class("StrideSamplerDCSolver").execute(text).result[0]
    ms = model.get_model_object("model_sampling")
    for steps, cfg, outside in ((5, 2.5, None), (8, 2.5, "steps 8 outside the searched 4-5"),
                                (4, 6.0, "cfg 6 outside the searched 2-3")):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            run(model, pos, neg, latent, sampler, comfy.samplers.calculate_sigmas(ms, "karras", steps), 0, cfg)
        warned = [r.getMessage() for r in caplog.records if "extrapolated" in r.getMessage()]
        assert (outside in warned[0]) if outside else not warned


@pytest.mark.parametrize("node", [n for n in NAN_CASES if n != "StrideCalibrateTeleport"])
def test_a_calibration_outside_inference_mode_builds_no_graph(node_class, store, node):
    """ComfyUI 0.3.75 creates model weights that require grad, and a calibration called outside the executor's
    inference mode (a script, a benchmark) then kept an autograd graph over hundreds of model calls: DPM-Solver-v3
    on a 128-channel latent grew past 23 GB and was killed. The gradient-free fits run without gradients."""
    model, pos, neg, latent = node_class("StrideDemoModel").execute("unet_small", "0123456789", 1, 1.0, False).result
    latent = {"samples": latent["samples"].repeat(2, 1, 1, 1)}
    model = model.clone()
    seen = []

    def wrapper(apply, args):
        seen.append(torch.is_grad_enabled())
        return apply(args["input"], args["timestep"], **args["c"])
    model.set_model_unet_function_wrapper(wrapper)
    for p in model.model.diffusion_model.parameters():
        p.requires_grad_(True)  # as the older tree creates them
    try:
        try:
            node_class(node).execute(model, pos, neg, latent, 3.0, "karras", 3, 2, 0, **NAN_CASES[node])
        except ValueError as e:  # a refusal on its held-out noise is fine here: the calls were made
            assert "refused" in str(e)
    finally:
        for p in model.model.diffusion_model.parameters():
            p.requires_grad_(False)
    assert len(seen) > 20 and not any(seen[1:])  # the first, cold call is outside the fit
