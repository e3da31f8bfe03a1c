"""What newer ComfyUI runtimes hand Stride: latents the guider cast to float32 and audio+video latents packed flat
([B, 1, N]), weights that move between devices between calls, and new built-in sampler names inserted into the
lists Stride appends its `stride_*` names to."""
import inspect
import json

import pytest
import torch

import comfy.samplers
from test_accel_comfy import demo

SHAPE = (2, 4, 8, 8)


def packed_noise(seed=0):
    """A noise sampler whose draws do not depend on the latent's layout (the same numbers, reshaped)."""
    gen = torch.Generator().manual_seed(seed)
    return lambda like: (lambda s, s_next: torch.randn(SHAPE, generator=gen, dtype=torch.float64).reshape(like.shape))


@pytest.mark.parametrize("name", ["stride_dpmpp_2m", "stride_dpmpp_3m", "stride_unipc", "stride_unipc_bh2",
                                  "stride_ddim_dualfast", "stride_dpmpp_2m_dualfast", "stride_unipc_dualfast",
                                  "stride_dpmpp_2m_hb", "stride_plms_hb", "stride_ghvb", "stride_dpmpp_2m_ts",
                                  "stride_flowturbo", "stride_mixed_sde"])
@pytest.mark.parametrize("flow", [False, True])
def test_every_stride_sampler_runs_on_a_packed_latent(stride, guided_oracle, name, flow):
    """A [B, 1, N] latent (ComfyUI's packing of nested latents) samples exactly as its [B, C, H, W] layout."""
    fn, options = stride("nodes.sampler_bridge").KSAMPLERS[name]
    core = stride("samplers.core")
    param = core.Param(True, 0.9999) if flow else core.VE
    denoise = guided_oracle(flow, [3, 7], 3.0)
    sigmas = torch.linspace(0.999, 0, 9, dtype=torch.float64) if flow else \
        torch.tensor([14.6, 6.0, 2.8, 1.3, 0.6, 0.25, 0.08, 0.03, 0.0], dtype=torch.float64)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * sigmas[0]
    runs = []
    for layout in (SHAPE, (SHAPE[0], 1, -1)):
        model = lambda y, s, **kw: denoise(y.reshape(SHAPE), s).reshape(y.shape)
        y = x.reshape(layout)
        accepts = inspect.signature(fn).parameters
        extra = {"param": param} if "param" in accepts else {}
        if "noise_sampler" in accepts:
            extra["noise_sampler"] = packed_noise()(y)
        runs.append(fn(model, y, sigmas, {}, None, True, **{**options, **extra}).reshape(SHAPE))
    assert torch.isfinite(runs[0]).all()
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-9, atol=1e-9)


def test_bottleneck_refuses_a_packed_latent_by_name(stride):
    bottleneck = stride("samplers.bottleneck")
    x = torch.zeros(1, 1, 256)
    with pytest.raises(ValueError, match="packed flat"):
        bottleneck.sample_bottleneck(lambda y, s, **kw: y, x, torch.tensor([1.0, 0.5, 0.2, 0.0]),
                                     scales=(0.5, 1.0), fractions=(0.5, 0.5), strengths=(1.0, 0.8),
                                     shifts=(1.0, 1.0))


class ReuseUnits:
    """A cache policy that reuses every stored unit (the runtime's bookkeeping is what is under test)."""
    def reset(self):
        pass

    def unit(self, call, unit):
        return True

    def block_done(self, call, unit, residual):
        pass


def test_reused_blocks_follow_the_dtype_and_device_of_the_call(stride):
    """A block residual stored in float32 answers a call whose streams are bfloat16 (ComfyUI may cast or move the
    weights between calls, as dynamic VRAM does): the reused residual takes the call's dtype and device, so the
    block's output matches its input as the model's own block would."""
    cache_mod = stride("nodes.cache")
    cache = cache_mod.Cache("cache plan", [], ReuseUnits())
    replace = cache.block("double_block.0")
    run = cache.new_run({})
    cache.local.call = {"run": run, "chunk": "c", "index": 0, "progress": 0.5, "reused": 0, "skip_rest": False}
    block = lambda args: {"img": args["img"] + 1.0, "txt": args["txt"] * 2.0}
    first = {"img": torch.zeros(1, 4, 8), "txt": torch.ones(1, 2, 8)}
    replace(first, {"original_block": block})
    assert run.unit_hits == 0
    second = {"img": torch.zeros(1, 4, 8, dtype=torch.bfloat16), "txt": torch.ones(1, 2, 8, dtype=torch.bfloat16)}
    out = replace(second, {"original_block": block})
    assert run.unit_hits == 1
    assert {k: v.dtype for k, v in out.items()} == {"img": torch.bfloat16, "txt": torch.bfloat16}
    torch.testing.assert_close(out["img"].float(), torch.ones(1, 4, 8))
    torch.testing.assert_close(out["txt"].float(), torch.full((1, 2, 8), 2.0))
    cache.local.call = None


def test_stride_names_are_appended_in_place_and_survive_new_builtin_names(stride, run_prompt):
    """ComfyUI's name lists keep their identity (other packs and nodes hold references to them); a saved workflow
    naming a stride_* sampler still runs when ComfyUI inserts built-in names before it."""
    lists = (comfy.samplers.KSAMPLER_NAMES, comfy.samplers.SAMPLER_NAMES, comfy.samplers.KSampler.SAMPLERS)
    ids = [id(names) for names in lists]
    before = [list(names) for names in lists]
    stride("nodes.sampler_bridge").register_ksampler_names()  # again: idempotent
    assert [id(names) for names in lists] == ids and [list(n) for n in lists] == before
    assert comfy.samplers.KSampler.SAMPLERS is comfy.samplers.SAMPLER_NAMES
    assert "stride_dpmpp_2m" in comfy.samplers.KSAMPLER_NAMES and "stride_dpmpp_2m" in comfy.samplers.SAMPLER_NAMES
    position = comfy.samplers.SAMPLER_NAMES.index("euler") + 1
    inserted = [n for n in (comfy.samplers.KSAMPLER_NAMES, comfy.samplers.SAMPLER_NAMES)]
    for names in inserted:
        names.insert(position, "a_new_builtin_sampler")
    try:
        prompt = {
            "m": {"class_type": "StrideDemoModel", "inputs": {"model": "oracle_eps", "digits": "3", "repeats": 1,
                                                            "shift": 1.0, "zero_terminal_snr": False}},
            "k": {"class_type": "KSampler", "inputs": {"model": ["m", 0], "positive": ["m", 1], "negative": ["m", 2],
                                                      "latent_image": ["m", 3], "seed": 1, "steps": 4, "cfg": 2.0,
                                                      "sampler_name": "stride_dpmpp_2m", "scheduler": "karras",
                                                      "denoise": 1.0}},
            "c": {"class_type": "StrideTestCapture", "inputs": {"latent": ["k", 0], "key": "out"}}}
        _, captured = run_prompt(prompt)
        assert torch.isfinite(captured["out"]).all()
    finally:
        for names in inserted:
            names.remove("a_new_builtin_sampler")


@pytest.mark.parametrize("model", ["oracle_eps", "oracle_flow", "unet_small", "unet_large", "dit_small", "dit_large"])
def test_every_demo_model_samples_through_a_stride_name_and_the_step_cache(run_prompt, caplog, model):
    """Each embedded model through the plain KSampler with a stride_* name, and through the step cache (permissive
    threshold: it must reuse calls, and say so)."""
    loader = {"class_type": "StrideDemoModel", "inputs": {"model": model, "digits": "37", "repeats": 1, "shift": 1.0,
                                                          "zero_terminal_snr": False}}
    cache = {"class_type": "StrideStepCache", "inputs": {"model": ["m", 0], "threshold": 5.0, "start": 0.0, "end": 1.0,
                                                         "max_hits": 1, "indicator": "input change"}}
    ksampler = lambda source, name: {"class_type": "KSampler", "inputs": {
        "model": source, "positive": ["m", 1], "negative": ["m", 2], "latent_image": ["m", 3], "seed": 2, "steps": 6,
        "cfg": 2.0, "sampler_name": name, "scheduler": "karras" if "eps" in model or "unet" in model else "simple",
        "denoise": 1.0}}
    prompt = {"m": loader, "sc": cache, "k1": ksampler(["m", 0], "stride_dpmpp_2m"), "k2": ksampler(["sc", 0], "euler"),
              "c1": {"class_type": "StrideTestCapture", "inputs": {"latent": ["k1", 0], "key": "stride"}},
              "c2": {"class_type": "StrideTestCapture", "inputs": {"latent": ["k2", 0], "key": "cached"}}}
    with caplog.at_level("INFO"):
        _, captured = run_prompt(prompt)
    assert torch.isfinite(captured["stride"]).all() and torch.isfinite(captured["cached"]).all()
    log = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Stride step cache:")]
    assert len(log) == 1 and int(log[0].split(":")[1].split()[0]) > 0, log


def test_expert_inputs_are_marked_advanced_where_the_api_has_the_flag(node_class):
    """Where V3 inputs take `advanced=` (newer ComfyUI), Stride's expert inputs carry it and its main inputs do not;
    where they do not, no input carries it (older ComfyUI would reject the keyword)."""
    from comfy_api.latest import io
    has_flag = "advanced" in inspect.signature(io.Input.__init__).parameters
    info = node_class("StrideStepCache").GET_SCHEMA().get_v1_info(node_class("StrideStepCache"))
    inputs = {**info.input["required"], **info.input.get("optional", {})}
    flagged = {name for name, (_, options) in inputs.items() if options.get("advanced")}
    assert flagged == ({"start", "end", "max_hits"} if has_flag else set())


@pytest.mark.parametrize("name", ["dit_small", "unet_small"])
def test_retrained_weights_are_saved_in_the_shipped_form_and_load_back(stride, name):
    """What demo/train.py saves (shipped_state) names Flux's QK norms as every supported ComfyUI can load them, and
    loads back into this tree's architecture exactly (through the config's own key conversion)."""
    nm = stride("nodes.neural_models")
    model = nm.load_model(name)[0].model
    shipped = nm.shipped_state(model.diffusion_model.state_dict())
    assert not [k for k in shipped if k.endswith(("query_norm.weight", "key_norm.weight"))]
    if name.startswith("dit"):
        assert any(k.endswith("query_norm.scale") for k in shipped)
    fresh = nm.build_base_model(name)
    missing, unexpected = nm.load_diffusion_weights(fresh.model_config, fresh.diffusion_model, shipped)
    assert not missing and not unexpected
    for key, value in fresh.diffusion_model.state_dict().items():
        assert torch.equal(value, model.diffusion_model.state_dict()[key]), key


def test_ld3_backpropagates_through_the_flux_dit_on_every_tree(node_class, calibration_store):
    """Newer ComfyUI computes Flux's rotary embedding with a kernel that has a backward only under its training
    flag; the calibrations that take gradients (LD3, Bespoke) set it while they run, and put it back."""
    import comfy.model_management
    before = getattr(comfy.model_management, "in_training", None)
    with torch.inference_mode():
        m, pos, neg, latent = node_class("StrideDemoModel").execute("dit_small", "37", 1, 1.0, False).result
        text = node_class("StrideScheduleLD3").execute(m, pos, neg, latent, 3.0, "euler", 4, 80, 2, 0, 1.0,
                                                       "auto").result[1]
    info = json.loads(text)["calibration"]
    assert info["iterations"] >= 1 and info["loss"] < info["initial_loss"]
    assert getattr(comfy.model_management, "in_training", None) == before


def test_fingerprints_take_tensors_of_real_model_size(stride):
    """A weight of more than 2**24 values (every real SDXL / Flux checkpoint has them) is fingerprinted too: sampled
    positions in float32 used to round past its end."""
    digest = stride("nodes.calibration_store")._digest
    big = torch.zeros(56623104, dtype=torch.bfloat16)
    first = digest([big])
    big[-1] = 1.0
    assert digest([big]) != first  # the last value is among the sampled ones


def test_the_step_cache_runs_on_a_packed_latent(stride, node_class):
    """Audio+video latents reach the model packed flat ([B, 1, N]): the step cache keys, measures and reuses them as
    any other latent (a reused call gives the packed shape back, from the last computed slope)."""
    cache_mod = stride("nodes.cache")
    ms = demo(node_class, "dit_small", "3")[0].get_model_object("model_sampling")
    test = stride("samplers.cache").ReuseTest(10.0, 0.0, 1.0, 5, accumulate=True)
    cache = cache_mod.Cache("step cache", [], cache_mod.AdaptivePolicy(test, "input"))

    class Executor:
        class_obj = type("BaseModel", (), {"model_sampling": ms})()

        def __call__(self, x, t, *args, **kwargs):
            return x * 0.5

    run = cache.new_run({})
    options = {cache.runs.key: run, "cond_or_uncond": [0], "uuids": ["u"]}
    x = torch.randn(2, 1, 4 * 8 * 8)
    first = cache.apply_model(Executor(), x, torch.tensor([0.8, 0.8]), transformer_options=options)
    second = cache.apply_model(Executor(), x * 0.99, torch.tensor([0.7, 0.7]), transformer_options=options)
    assert run.call_hits == 1 and second.shape == x.shape == first.shape
    slope = (x - first) / 0.8
    torch.testing.assert_close(second, x * 0.99 - 0.7 * slope)
