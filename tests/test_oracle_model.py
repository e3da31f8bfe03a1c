"""The oracle as a real ComfyUI MODEL: exact through ComfyUI's model path, samplers converge to x_ref,
the demo nodes run in the real PromptExecutor, and bad input gets a clear error."""
import pytest
import torch

import comfy.sample
import comfy.samplers
from bench.reference import error_vs_reference, oracle_reference


@pytest.fixture(scope="module")
def om(stride):
    return stride("nodes.oracle_model")


@pytest.mark.parametrize("param,shift,sigma", [("eps", 1.0, 0.4567), ("eps", 1.0, 9.1), ("flow", 1.0, 0.3),
                                               ("flow", 3.0, 0.81)])
def test_model_output_is_the_analytic_denoiser(om, oracle_model, param, shift, sigma):
    """Off the discrete EPS grid and with a flow shift: the model reads the exact sigma, not sigma(t)."""
    patcher = oracle_model(param, shift)
    model = patcher.model
    labels = torch.tensor([3, -1])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * (1 + sigma)
    s = torch.full((2,), sigma)
    context = om.digit_conditioning(labels)[0][0]
    out = model.apply_model(x, s, c_crossattn=context, transformer_options={"sigmas": s})
    alpha = 1.0 if param == "eps" else 1.0 - sigma
    expected = om.load_mixture().denoise(x.double(), sigma, alpha, labels)
    assert (out.double() - expected).abs().max() < 1e-4
    # Without the exact sigma, the model falls back to sigma(t): rounded (EPS) or shifted again (flow).
    fallback = model.apply_model(x, s, c_crossattn=context, transformer_options={})
    exact_without_sigmas = param == "flow" and shift == 1.0  # sigma(t) = t / 1000 is exact there
    assert ((fallback.double() - expected).abs().max() > 1e-4) != exact_without_sigmas


@pytest.mark.parametrize("param,scheduler", [("eps", "karras"), ("flow", "simple")])
def test_comfyui_sampler_converges_to_the_reference(om, oracle_model, param, scheduler):
    patcher = oracle_model(param)
    ms = patcher.get_model_object("model_sampling")
    labels = list(range(10))
    latent = torch.zeros(10, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 7)
    pos, neg = om.digit_conditioning(labels), om.digit_conditioning([-1])
    mixture = om.load_mixture()
    errors = []
    for steps in (8, 16, 32):
        sigmas = comfy.samplers.calculate_sigmas(ms, scheduler, steps)
        x = comfy.sample.sample_custom(patcher, noise, 5.5, comfy.samplers.ksampler("dpmpp_2m"), sigmas, pos, neg,
                                       latent, seed=7, disable_pbar=True)
        x_ref = oracle_reference(mixture, ms, sigmas[0], noise, labels, 5.5, rtol=1e-7)
        errors.append(error_vs_reference(x, x_ref, mixture.data_std()).mean().item())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.02  # a second-order solver at 32 steps is close to the exact answer


@pytest.mark.parametrize("param,cfg", [("eps", 5.5), ("flow", 1.0)])
def test_reference_sampler_in_comfyui_matches_the_analytic_reference(stride, om, oracle_model, param, cfg):
    """sample_reference run as a ComfyUI sampler (how networks get x_ref) agrees with the analytic path."""
    patcher = oracle_model(param)
    ms = patcher.get_model_object("model_sampling")
    labels = list(range(10))
    latent = torch.zeros(10, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 11)
    sigmas = torch.tensor([float(ms.sigma_max), float(ms.sigma_min), 0.0])
    sampler = comfy.samplers.KSAMPLER(stride("samplers.reference").sample_reference, {"rtol": 1e-6, "atol": 1e-6})
    x = comfy.sample.sample_custom(patcher, noise, cfg, sampler, sigmas, om.digit_conditioning(labels),
                                   om.digit_conditioning([-1]), latent, seed=11, disable_pbar=True)
    mixture = om.load_mixture()
    x_ref = oracle_reference(mixture, ms, sigmas[0], noise, labels, cfg, rtol=1e-8)
    assert error_vs_reference(x, x_ref, mixture.data_std()).max() < 1e-3


def _demo_prompt(model="oracle_eps", digits="0123456789", shift=1.0, zsnr=False, latent_from=None):
    prompt = {
        "1": {"class_type": "StrideDemoModel", "inputs": {"model": model, "digits": digits, "repeats": 1, "shift": shift,
                                                          "zero_terminal_snr": zsnr}},
        "2": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["1", 1], "negative": ["1", 2],
                                                   "latent_image": latent_from or ["1", 3], "seed": 3, "steps": 12,
                                                   "cfg": 3.0, "sampler_name": "euler", "scheduler": "karras",
                                                   "denoise": 1.0}},
        "3": {"class_type": "StrideDigitsDecode", "inputs": {"samples": ["2", 0], "scale": 4}},
        "4": {"class_type": "StrideTestCapture", "inputs": {"key": "image", "image": ["3", 0]}},
        "5": {"class_type": "StrideTestCapture", "inputs": {"key": "latent", "latent": ["2", 0]}},
    }
    return prompt


@pytest.mark.parametrize("model", ["oracle_eps", "oracle_flow"])
def test_demo_graph_runs_in_the_prompt_executor(run_prompt, model):
    _, captured = run_prompt(_demo_prompt(model))
    image, latent = captured["image"], captured["latent"]
    assert image.shape == (10, 64, 64, 3) and latent.shape == (10, 4, 8, 8)
    assert 0.0 <= image.min() and image.max() <= 1.0
    # Digits are white strokes on black: some bright, mostly dark pixels, and each image differs.
    assert (image > 0.5).float().mean() > 0.05 and (image < 0.1).float().mean() > 0.3
    assert (image[0] - image[1]).abs().mean() > 0.05


def test_decode_is_exact_depth_to_space(stride, node_class):
    mixture = stride("nodes.oracle_model").load_mixture()
    digits = stride("demo.digits")
    images = torch.randint(0, 17, (3, 8, 8)).double()
    latent = digits.encode(images, mixture.latent_mean, mixture.latent_std)
    grey = node_class("StrideDigitsDecode").execute({"samples": latent.float()}, 1).result[0][..., 0]
    upsampled = torch.nn.functional.interpolate(images.unsqueeze(1) / 16, size=(16, 16), mode="bilinear")[:, 0]
    assert torch.allclose(grey.double(), upsampled.clamp(0, 1), atol=1e-5)


@pytest.mark.parametrize("digits", ["x", "", "1,2;3"])
def test_unknown_digit_is_a_clear_error(run_prompt, digits):
    with pytest.raises(RuntimeError, match="digits must list digits 0-9"):
        run_prompt(_demo_prompt(digits=digits))


def test_shift_on_the_eps_oracle_is_a_clear_error(run_prompt):
    with pytest.raises(RuntimeError, match="flow-model option"):
        run_prompt(_demo_prompt(shift=3.0))


def test_eps_only_option_on_the_flow_oracle_is_a_clear_error(run_prompt):
    with pytest.raises(RuntimeError, match="zero_terminal_snr is an EPS option"):
        run_prompt(_demo_prompt(model="oracle_flow", zsnr=True))


def test_zero_terminal_snr_eps_oracle_starts_from_pure_noise(om, oracle_model):
    ms = oracle_model("eps", zero_terminal_snr=True).get_model_object("model_sampling")
    assert float(ms.sigma_max) > 1000 > float(oracle_model("eps").get_model_object("model_sampling").sigma_max)


def test_zero_terminal_snr_eps_oracle_samples_digits(run_prompt):
    _, captured = run_prompt(_demo_prompt(zsnr=True))
    image = captured["image"]
    assert torch.isfinite(image).all() and (image > 0.5).float().mean() > 0.05


def test_wrong_latent_shape_is_a_clear_error(run_prompt):
    prompt = _demo_prompt()
    prompt["9"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}}
    prompt["2"]["inputs"]["latent_image"] = ["9", 0]
    with pytest.raises(RuntimeError, match=r"\[batch, 4, 8, 8\] digits latents"):
        run_prompt(prompt)


def test_decoding_a_foreign_latent_is_a_clear_error(node_class):
    with pytest.raises(ValueError, match=r"\[batch, 4, 8, 8\]"):
        node_class("StrideDigitsDecode").execute({"samples": torch.zeros(1, 4, 16, 16)}, 1)


def test_foreign_conditioning_is_a_clear_error(oracle_model):
    patcher = oracle_model("eps")
    x = torch.zeros(1, 4, 8, 8)
    s = torch.ones(1)
    with pytest.raises(ValueError, match="digit conditioning"):
        patcher.model.apply_model(x, s, c_crossattn=torch.zeros(1, 77, 768), transformer_options={"sigmas": s})


def test_the_mixture_loaded_inside_comfyui_stays_differentiable(om):
    """ComfyUI runs nodes under inference mode; the cached mixture made there must still serve a later calibration
    with gradients (LD3, Bespoke) in the same process."""
    om.load_mixture.cache_clear()
    with torch.inference_mode():
        mixture = om.load_mixture()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    sigma = torch.full((2,), 1.0, dtype=torch.float64)
    out = mixture.guided_denoise(x, sigma, torch.ones(2, dtype=torch.float64), torch.tensor([1, 2]), 3.0)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
