"""A small demo network re-expressed to take its large sibling's conditioning (for T-Stitch): exactly the small
model, given the large model's conditioning, in the denoiser, in sampling and through the loader node in a real
prompt; the plain small model misreads that conditioning; the folded one still draws the requested digits; the
original small model is untouched; misuse is a clear error."""
import pytest
import torch

import comfy.sample

DIGITS = "0123456789"
FAMILIES = {"unet": "normal", "dit": "simple"}  # family -> scheduler (bench/quality.py's)
SHARED = "large sibling's"


def load(node_class, name, conditioning=None, digits=DIGITS):
    """(ModelPatcher, positive, negative, latent) from StrideDemoModel, the old five arguments positionally."""
    extra = () if conditioning is None else (conditioning,)
    return node_class("StrideDemoModel").execute(name, digits, 1, 1.0, False, *extra).result


def sample(model, positive, negative, latent, scheduler, steps=8, cfg=3.0, seed=5):
    noise = comfy.sample.prepare_noise(latent["samples"], seed)
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, steps, cfg, "euler", scheduler, positive, negative,
                                   latent["samples"], seed=seed, disable_pbar=True)


def denoise(model, conditioning, x, sigma):
    """The model's denoiser output on x for one CONDITIONING (a batch of one repeated to x's batch)."""
    fit = lambda c: c.expand(x.shape[0], *c.shape[1:]) if c.shape[0] == 1 else c
    extras = conditioning[0][1]
    y = {"y": fit(extras["pooled_output"])} if "pooled_output" in extras else {}
    with torch.inference_mode():
        return model.model.apply_model(x, sigma, c_crossattn=fit(conditioning[0][0]), transformer_options={}, **y)


@pytest.fixture(scope="module")
def family(node_class):
    """family('unet' | 'dit') -> {'small': own loader outputs, 'folded': the small model with its large sibling's
    conditioning, 'large': the large model's}, loaded once."""
    loaded = {}

    def get(name):
        if name not in loaded:
            loaded[name] = {"small": load(node_class, f"{name}_small"),
                            "folded": load(node_class, f"{name}_small", SHARED),
                            "large": load(node_class, f"{name}_large")}
        return loaded[name]
    return get


@pytest.mark.parametrize("name", FAMILIES)
def test_folded_small_model_on_the_large_conditioning_is_the_small_model(family, name):
    small, pos, neg, latent = family(name)["small"]
    folded, pos_large, neg_large, latent_folded = family(name)["folded"]
    _, pos_l, neg_l, _ = family(name)["large"]
    # The node outputs the large model's conditioning: the two loaders' positive/negative are interchangeable.
    for ours, theirs in ((pos_large, pos_l), (neg_large, neg_l)):
        assert torch.equal(ours[0][0], theirs[0][0])
        assert ours[0][1].keys() == theirs[0][1].keys()
        assert all(torch.equal(ours[0][1][k], theirs[0][1][k]) for k in ours[0][1])
    assert not torch.allclose(pos_large[0][0], pos[0][0])
    assert latent_folded["samples"].shape == latent["samples"].shape
    # The denoiser, at several noise levels ...
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(10, 4, 8, 8, generator=gen)
    for s in (0.05, 0.5, 0.95) if name == "dit" else (0.1, 2.0, 14.0):
        sigma = torch.full((10,), s)
        for c, c_large in ((pos, pos_large), (neg, neg_large)):
            own = denoise(small, c, x, sigma)
            torch.testing.assert_close(denoise(folded, c_large, x, sigma), own, rtol=0, atol=2e-5)
    # ... and sampling with classifier-free guidance.
    scheduler = FAMILIES[name]
    torch.testing.assert_close(sample(folded, pos_large, neg_large, latent, scheduler),
                               sample(small, pos, neg, latent, scheduler), rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_plain_small_model_misreads_the_large_conditioning(family, stride, name):
    small, pos, neg, latent = family(name)["small"]
    _, pos_large, neg_large, _ = family(name)["large"]
    own = sample(small, pos, neg, latent, FAMILIES[name])
    misread = sample(small, pos_large, neg_large, latent, FAMILIES[name])
    assert (own - misread).abs().max() > 1.0
    # Not merely another sample of the same digits: it draws the wrong ones (chance is 0.1).
    classifier = stride("demo.classifier").load()
    assert classifier.accuracy(own, torch.arange(10)) >= 0.7
    assert classifier.accuracy(misread, torch.arange(10)) <= 0.4


@pytest.mark.parametrize("name", FAMILIES)
def test_folded_small_model_draws_the_requested_digits(family, stride, name):
    classifier = stride("demo.classifier").load()
    folded, pos_large, neg_large, latent = family(name)["folded"]
    large = family(name)["large"][0]
    labels = torch.arange(10)
    for model in (large, folded):
        x = sample(model, pos_large, neg_large, latent, FAMILIES[name], steps=15, seed=1)
        assert classifier.accuracy(x, labels) >= 0.7


@pytest.mark.parametrize("name", FAMILIES)
def test_maps_are_exact_and_the_original_small_model_is_untouched(stride, name):
    nm = stride("nodes.neural_models")
    small, large = f"{name}_small", f"{name}_large"
    maps = nm.conditioning_maps(small, large)
    assert set(maps) == ({"context", "pooled"} if name == "dit" else {"context"})
    assert all(residual < 1e-10 for _, residual in maps.values())
    with torch.inference_mode():  # as a prompt runs it: the original's weights are inference tensors
        patcher, _ = nm.load_model(small)
    before = {k: v.clone() for k, v in patcher.model.diffusion_model.state_dict().items()}
    folded = nm.adopt_conditioning(patcher, small, large)
    after = patcher.model.diffusion_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert folded is not patcher and folded.model is not patcher.model
    # Only the layers that first see the conditioning changed: the DiT's two input layers; the UNet's to_k and
    # to_v of every cross-attention (7 transformer blocks: 2 down, 1 middle, 4 up).
    new = folded.model.diffusion_model.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], new[k]))
    if name == "dit":
        assert changed == ["txt_in.weight", "vector_in.in_layer.weight"]
    else:
        cross = sorted(k for k in before if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")))
        assert changed == cross and len(cross) == 14


def test_the_shared_conditioning_runs_in_a_prompt(run_prompt):
    """The optional input through ComfyUI's validation and executor: the large loader's conditioning drives the
    folded small model to the small model's own result."""
    def loader(model, **extra):
        return {"class_type": "StrideDemoModel", "inputs": {"model": model, "digits": "37", "repeats": 1,
                                                            "shift": 1.0, "zero_terminal_snr": False, **extra}}

    def ksampler(model, cond):
        return {"class_type": "KSampler", "inputs": {"model": model, "positive": [cond, 1], "negative": [cond, 2],
                                                     "latent_image": [cond, 3], "seed": 5, "steps": 4, "cfg": 3.0,
                                                     "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}
    prompt = {"1": loader("unet_small"), "2": loader("unet_small", conditioning=SHARED), "3": loader("unet_large"),
              "4": ksampler(["1", 0], "1"), "5": ksampler(["2", 0], "3"),
              "6": {"class_type": "StrideTestCapture", "inputs": {"key": "own", "latent": ["4", 0]}},
              "7": {"class_type": "StrideTestCapture", "inputs": {"key": "shared", "latent": ["5", 0]}}}
    _, captured = run_prompt(prompt)
    torch.testing.assert_close(captured["shared"], captured["own"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["unet_large", "dit_large", "oracle_eps", "oracle_flow"])
def test_shared_conditioning_applies_to_small_models_only(node_class, name):
    with pytest.raises(ValueError, match="applies to small models only"):
        load(node_class, name, SHARED)


def test_unknown_conditioning_option_is_a_clear_error(node_class):
    with pytest.raises(ValueError, match="conditioning must be one of"):
        load(node_class, "unet_small", "large")


@pytest.mark.parametrize("small,large", [("unet_small", "dit_large"), ("dit_small", "unet_large"),
                                         ("unet_large", "unet_small"), ("dit_small", "dit_small")])
def test_pairs_across_families_or_sizes_are_refused(stride, small, large):
    nm = stride("nodes.neural_models")
    with pytest.raises(ValueError, match="small model onto its large sibling of the same family"):
        nm.conditioning_maps(small, large)
    with pytest.raises(ValueError, match="small model onto its large sibling of the same family"):
        nm.adopt_conditioning(None, small, large)


def test_a_model_of_another_architecture_is_refused(stride):
    nm = stride("nodes.neural_models")
    patcher, _ = nm.load_model("unet_large")
    with pytest.raises(ValueError, match="is not a unet_small"):
        nm.adopt_conditioning(patcher, "unet_small", "unet_large")


def test_an_inexact_map_is_a_clear_error(stride, monkeypatch):
    nm = stride("nodes.neural_models")
    real = nm.load_embedding

    def degenerate(name):  # the large model giving digits 0 and 1 the same embedding: no map can separate them
        embedding = real(name)
        if name.endswith("_large"):
            with torch.no_grad():
                embedding.context.weight[1] = embedding.context.weight[0]
        return embedding
    monkeypatch.setattr(nm, "load_embedding", degenerate)
    with pytest.raises(ValueError, match="cannot be mapped exactly"):
        nm.conditioning_maps("unet_small", "unet_large")


def test_t_stitch_of_the_folded_small_model_runs_on_the_large_conditioning(family, node_class):
    """What it is for: StrideTStitch with one conditioning for both models; at fraction 1 (all small) it is the
    small model on its own conditioning."""
    small, pos, neg, latent = family("dit")["small"]
    folded = family("dit")["folded"][0]
    large, pos_large, neg_large, _ = family("dit")["large"]
    stitched = node_class("StrideTStitch").execute(large, folded, 1.0).result[0]
    torch.testing.assert_close(sample(stitched, pos_large, neg_large, latent, "simple"),
                               sample(small, pos, neg, latent, "simple"), rtol=0, atol=1e-4)
