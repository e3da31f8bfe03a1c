"""The embedded trained networks through the demo loader node and the real KSampler."""
import pytest
import torch

import comfy.model_sampling

NETWORKS = ["unet_large", "unet_small", "dit_large", "dit_small"]
PAIRS = [("unet_large", "unet_small"), ("dit_large", "dit_small")]


@pytest.fixture(scope="module")
def load(node_class):
    """load(name) -> (ModelPatcher, positive, negative, latent) from the StrideDemoModel node."""
    loader = node_class("StrideDemoModel")
    return lambda name, digits="0123456789": loader.execute(name, digits, 1, 1.0, False).result


@pytest.mark.parametrize("name", NETWORKS)
def test_loader_node_returns_the_trained_network(load, name):
    patcher, positive, negative, latent = load(name)
    model = patcher.model
    flow = name.startswith("dit")
    assert isinstance(model.model_sampling, comfy.model_sampling.CONST) == flow
    assert isinstance(model.model_sampling, comfy.model_sampling.EPS) != flow
    assert type(model.diffusion_model).__module__ == ("comfy.ldm.flux.model" if flow else
                                                      "comfy.ldm.modules.diffusionmodules.openaimodel")
    assert latent["samples"].shape == (10, 4, 8, 8)
    assert positive[0][0].shape[0] == 10 and negative[0][0].shape[0] == 1
    assert positive[0][0].dtype == torch.float32
    assert all(torch.isfinite(p).all() for p in model.diffusion_model.parameters())
    # Different digits get different conditioning, and the null condition is neither.
    assert (positive[0][0][0] - positive[0][0][1]).abs().max() > 1e-3


def _ksampler_prompt(model, steps=8):
    return {
        "1": {"class_type": "StrideDemoModel", "inputs": {"model": model, "digits": "0123456789", "repeats": 1,
                                                          "shift": 1.0, "zero_terminal_snr": False}},
        "2": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["1", 1], "negative": ["1", 2],
                                                   "latent_image": ["1", 3], "seed": 5, "steps": steps, "cfg": 3.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "3": {"class_type": "StrideTestCapture", "inputs": {"key": "latent", "latent": ["2", 0]}},
    }


@pytest.mark.parametrize("name", NETWORKS)
def test_ksampler_runs_on_each_network(run_prompt, name):
    _, captured = run_prompt(_ksampler_prompt(name))
    latent = captured["latent"]
    assert latent.shape == (10, 4, 8, 8) and latent.dtype == torch.float32
    assert torch.isfinite(latent).all()
    # A sampled latent has the data's scale (normalized latents: std about 0.66), not noise's or zero.
    assert 0.3 < latent.std() < 1.5


@pytest.mark.parametrize("large,small", PAIRS)
def test_pair_accepts_the_same_inputs(load, large, small):
    big, pos_big, neg_big, latent_big = load(large)
    little, pos_small, neg_small, latent_small = load(small)
    assert pos_big[0][0].shape == pos_small[0][0].shape
    assert {k: v.shape for k, v in pos_big[0][1].items()} == {k: v.shape for k, v in pos_small[0][1].items()}
    assert latent_big["samples"].shape == latent_small["samples"].shape
    ms_big, ms_small = big.get_model_object("model_sampling"), little.get_model_object("model_sampling")
    assert type(ms_big).__mro__[1:] == type(ms_small).__mro__[1:]
    assert torch.equal(ms_big.sigmas, ms_small.sigmas)
    # The small network runs on the large one's inputs (same latent space and conditioning format) ...
    x = torch.randn(10, 4, 8, 8)
    sigma = torch.full((10,), 0.5)
    extra = {"y": pos_big[0][1]["pooled_output"]} if "pooled_output" in pos_big[0][1] else {}
    out = little.model.apply_model(x, sigma, c_crossattn=pos_big[0][0], transformer_options={}, **extra)
    assert out.shape == x.shape and torch.isfinite(out).all()
    # ... and is several times cheaper: at least 2.5x fewer parameters.
    count = lambda p: sum(t.numel() for t in p.model.diffusion_model.parameters())
    assert count(big) >= 2.5 * count(little)


def test_oracle_options_on_a_network_are_a_clear_error(load, node_class):
    with pytest.raises(ValueError, match="options of the oracle models"):
        node_class("StrideDemoModel").execute("unet_small", "1", 1, 3.0, False)


def test_missing_weights_are_a_clear_error(stride, monkeypatch, tmp_path):
    nm = stride("nodes.neural_models")
    monkeypatch.setattr(nm, "WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="demo.train"):
        nm.load_model("dit_small")
