"""The tiny real-architecture models run through ComfyUI's real sampling path and honour its extension points."""
import pytest
import torch

import comfy.ldm.modules.attention
import comfy.model_base
import comfy.model_sampling
import comfy.patcher_extension
import comfy.sample
import comfy.samplers

DIFFUSION_MODEL = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
# Position of transformer_options among the diffusion module's forward arguments.
TRANSFORMER_OPTIONS_ARG = {"unet": 5, "dit": 7}
STEPS = 4
ModelType = comfy.model_base.ModelType


@pytest.fixture(params=["unet", "dit"])
def tiny(request, tiny_unet, tiny_dit):
    """(kind, TinyModel) for each architecture."""
    return request.param, {"unet": tiny_unet, "dit": tiny_dit}[request.param]()


def sample(model, positive, negative, latent, sampler="euler", steps=STEPS, cfg=4.0, seed=0, noise=None):
    if noise is None:
        noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, "normal", positive, negative, latent,
                               seed=seed, disable_pbar=True)


def row(conditioning, i):
    """Item i of every batched tensor in a CONDITIONING."""
    return [[c[i:i + 1], {k: (v[i:i + 1] if torch.is_tensor(v) else v) for k, v in extras.items()}]
            for c, extras in conditioning]


def relative_difference(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_model_configuration(tiny_unet, tiny_dit):
    unet, dit = tiny_unet().model, tiny_dit().model
    assert isinstance(unet.model, comfy.model_base.BaseModel) and unet.model.model_type == ModelType.EPS
    assert isinstance(unet.get_model_object("model_sampling"), comfy.model_sampling.ModelSamplingDiscrete)
    assert abs(unet.get_model_object("model_sampling").sigma_max.item() - 14.6146) < 1e-3  # SD1.5 schedule
    assert isinstance(dit.model, comfy.model_base.Flux) and dit.model.model_type == ModelType.FLUX
    assert isinstance(dit.get_model_object("model_sampling"), comfy.model_sampling.ModelSamplingFlux)
    for patcher in (unet, dit):
        latent_format = patcher.get_model_object("latent_format")
        assert latent_format.latent_channels == 4 and latent_format.scale_factor == 1.0
        assert all(torch.isfinite(p).all() for p in patcher.model.diffusion_model.parameters())


def test_shape_finite_and_deterministic(tiny):
    _, (model, positive, negative, latent) = tiny
    lat = latent(2)
    out = sample(model, positive(), negative(), lat, seed=7)
    assert out.shape == lat.shape
    assert torch.isfinite(out).all()
    assert out.abs().max() > 0.1  # the weights are initialised: the model does not answer zeros
    assert torch.equal(out, sample(model, positive(), negative(), lat, seed=7))
    assert relative_difference(sample(model, positive(), negative(), lat, seed=8), out) > 0.1


def test_samplers_differ_clearly(tiny):
    _, (model, positive, negative, latent) = tiny
    euler = sample(model, positive(), negative(), latent(), "euler")
    dpmpp = sample(model, positive(), negative(), latent(), "dpmpp_2m")
    assert relative_difference(dpmpp, euler) > 0.05


def test_cfg_guider_path_matches_comfy_sample(tiny):
    _, (model, positive, negative, latent) = tiny
    lat = latent()
    noise = comfy.sample.prepare_noise(lat, 3)
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive(), negative())
    guider.set_cfg(4.0)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", STEPS)
    out = guider.sample(noise, lat, comfy.samplers.sampler_object("euler"), sigmas, seed=3, disable_pbar=True)
    assert torch.equal(out, sample(model, positive(), negative(), lat, seed=3, noise=noise))


@pytest.mark.parametrize("sampler, evaluations", [("euler", STEPS), ("heun", 2 * STEPS - 1)])
def test_diffusion_model_wrapper_once_per_evaluation(tiny, sampler, evaluations):
    kind, (model, positive, negative, latent) = tiny
    calls = []

    def wrapper(executor, *args, **kwargs):
        options = args[TRANSFORMER_OPTIONS_ARG[kind]]
        calls.append((list(options["cond_or_uncond"]), args[0].shape[0]))
        return executor(*args, **kwargs)

    patched = model.clone()
    patched.add_wrapper_with_key(DIFFUSION_MODEL, "test_count", wrapper)
    plain = sample(model, positive(), negative(), latent(2), sampler)
    wrapped = sample(patched, positive(), negative(), latent(2), sampler)
    assert len(calls) == evaluations
    assert all(sorted(cond_or_uncond) == [0, 1] and rows == 4 for cond_or_uncond, rows in calls)  # CFG pair, batched
    assert torch.equal(wrapped, plain)
    # Clone isolation: the original patcher never had the wrapper.
    assert model.get_wrappers(DIFFUSION_MODEL, "test_count") == []
    sample(model, positive(), negative(), latent(2), sampler)
    assert len(calls) == evaluations


def test_cfg_one_skips_the_unconditional_pass(tiny):
    kind, (model, positive, negative, latent) = tiny
    seen = []
    patched = model.clone()
    patched.add_wrapper_with_key(DIFFUSION_MODEL, "test_cfg1", lambda executor, *args, **kwargs: (
        seen.append(list(args[TRANSFORMER_OPTIONS_ARG[kind]]["cond_or_uncond"])), executor(*args, **kwargs))[1])
    sample(patched, positive(), negative(), latent(), cfg=1.0)
    assert seen == [[0]] * STEPS


def test_dit_double_block_patch(tiny_dit):
    model, positive, negative, latent = tiny_dit()
    calls = {0: 0, 1: 0}

    def identity(index):
        def patch(args, extra):
            calls[index] += 1
            assert args["transformer_options"]["block_index"] == index
            return extra["original_block"](args)
        return patch

    patched = model.clone()
    for i in calls:
        patched.set_model_patch_replace(identity(i), "dit", "double_block", i)
    plain = sample(model, positive(), negative(), latent())
    assert torch.equal(sample(patched, positive(), negative(), latent()), plain)
    assert calls == {0: STEPS, 1: STEPS}

    def halve_img(args, extra):
        out = extra["original_block"](args)
        return {"img": 0.5 * out["img"], "txt": out["txt"]}

    changed = model.clone()
    changed.set_model_patch_replace(halve_img, "dit", "double_block", 1)
    assert relative_difference(sample(changed, positive(), negative(), latent()), plain) > 0.01
    assert "patches_replace" not in model.model_options["transformer_options"]


def test_unet_attention_patches(tiny_unet):
    model, positive, negative, latent = tiny_unet()
    transformer_blocks = sum(isinstance(m, comfy.ldm.modules.attention.BasicTransformerBlock)
                             for m in model.model.diffusion_model.modules())
    assert transformer_blocks == 7  # 2 input, 1 middle, 4 output
    calls = {"attn1": 0, "attn2": 0}

    def attn1_patch(q, k, v, extra_options):
        calls["attn1"] += 1
        return q, k, v

    def attn2_identity(q, k, v, extra_options):
        calls["attn2"] += 1
        return comfy.ldm.modules.attention.optimized_attention(q, k, v, extra_options["n_heads"])

    patched = model.clone()
    patched.set_model_attn1_patch(attn1_patch)
    patched.set_model_attn2_replace(attn2_identity, "middle", 0)
    plain = sample(model, positive(), negative(), latent())
    torch.testing.assert_close(sample(patched, positive(), negative(), latent()), plain)
    assert calls == {"attn1": transformer_blocks * STEPS, "attn2": STEPS}

    ignore_prompt = model.clone()
    ignore_prompt.set_model_attn2_replace(lambda q, k, v, extra_options: torch.zeros_like(q), "middle", 0)
    assert relative_difference(sample(ignore_prompt, positive(), negative(), latent()), plain) > 0.01


def test_batch_equals_items_sampled_alone(tiny):
    _, (model, positive, negative, latent) = tiny
    lat = latent(2)
    noise = comfy.sample.prepare_noise(lat, 11)
    together = sample(model, positive(), negative(), lat, noise=noise)
    for i in range(2):
        alone = sample(model, positive(), negative(), lat[i:i + 1], noise=noise[i:i + 1])
        torch.testing.assert_close(together[i:i + 1], alone, rtol=1e-4, atol=1e-4 * alone.abs().max().item())
    assert relative_difference(together[0], together[1]) > 0.1


def test_combined_conditioning_is_averaged(tiny):
    _, (model, positive, negative, latent) = tiny
    a, b = positive(seed=1), positive(seed=5)
    combined = a + b  # what ConditioningCombine returns
    outs = {name: sample(model, cond, negative(), latent()) for name, cond in
            [("a", a), ("b", b), ("a+b", combined)]}
    assert relative_difference(outs["a+b"], outs["a"]) > 0.01
    assert relative_difference(outs["a+b"], outs["b"]) > 0.01
    # One Euler step from sigma_max at cfg 1 returns the denoised estimate: ComfyUI averages the two conds.
    one = {name: sample(model, cond, negative(), latent(), steps=1, cfg=1.0) for name, cond in
           [("a", a), ("b", b), ("a+b", combined)]}
    expected = (one["a"] + one["b"]) / 2
    torch.testing.assert_close(one["a+b"], expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_conditioning_batch_differs_from_latent_batch(tiny):
    """ComfyUI repeats or truncates a conditioning batch to the latent batch (comfy.utils.repeat_to_batch_size)."""
    _, (model, positive, negative, latent) = tiny
    cond = positive(batch=2)  # two different prompts
    lat = latent(3)
    noise = comfy.sample.prepare_noise(lat, 5)
    together = sample(model, cond, negative(), lat, noise=noise)
    for i, prompt in enumerate([0, 1, 0]):  # repeated: a, b, a
        alone = sample(model, row(cond, prompt), negative(), lat[i:i + 1], noise=noise[i:i + 1])
        torch.testing.assert_close(together[i:i + 1], alone, rtol=1e-4, atol=1e-4 * alone.abs().max().item())
    # A larger conditioning batch than the latent's is truncated to its first items.
    truncated = sample(model, cond, negative(), lat[:1], noise=noise[:1])
    assert torch.equal(truncated, sample(model, row(cond, 0), negative(), lat[:1], noise=noise[:1]))
    assert relative_difference(truncated, sample(model, row(cond, 1), negative(), lat[:1], noise=noise[:1])) > 0.01
