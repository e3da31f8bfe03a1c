"""Stride's samplers inside the real ComfyUI: the stride_* names in KSampler / KSamplerSelect, every name through
KSampler and every SAMPLER node through SamplerCustomAdvanced on the EPS and flow oracles (batch 2, measured
against the exact reference), parity with ComfyUI's own samplers, denoise < 1, a sigma list split across two
sampler nodes, clear errors for bad options, and a fresh server process that runs a stride_* workflow."""
import urllib.parse

import pytest
import safetensors.torch
import torch

import comfy.sample
import comfy.samplers
from bench import host
from bench.reference import alpha_of, error_vs_reference, oracle_reference
from comfy_server import get, post_json, wait_for_history

DIGITS, LABELS, SEED, STEPS, CFG = "37", [3, 7], 5, 10, 3.0
SCHEDULER = {"oracle_eps": "karras", "oracle_flow": "simple"}
MODELS = list(SCHEDULER)
NODE_OPTIONS = {  # every SAMPLER node, with non-default options where they change the algorithm
    "StrideSamplerDPMPP": {"order": 3, "half_log_snr": "ve"},
    "StrideSamplerUniPC": {"order": 2, "variant": "bh2"},
    "StrideSamplerDualFast": {"base": "unipc_bh2"},
    "StrideSamplerHeavyBall": {"base": "plms"},
    "StrideSamplerGHVB": {"order": 1.5},
    "StrideSamplerTimeShift": {"base": "dpmpp_3m"},
    "StrideSamplerFlowTurbo": {"heun_steps": 3},
    "StrideSamplerMixedSDE": {"eta": 0.5, "window_start": 0.25, "window_end": 0.5},
}
# Error vs x_ref (per image, in data std) of a 10-step run. For scale: the zero latent is 1.5 off, another sample of
# the same digit 0.8-1.5, the other digit 1.3-1.6; Euler measures 0.12 (EPS) / 0.16 (flow). BOUND is only the
# sanity bound of the routing tests; the per-method bounds below tell each sampler from Euler.
BOUND = 0.3
# Per stride_* name, (EPS, flow): its error at 10 steps must stay below this fraction of Euler's in the same run
# (measured error + 0.002, over Euler's; the SDE + 0.02). Measured: e.g. stride_unipc_bh2 0.049 / 0.053, stride_ghvb
# 0.029 / 0.098, Euler 0.122 / 0.156. Near 1 means the method barely beats Euler there (DualFast on 2M, EPS).
# stride_mixed_sde's SDE steps draw fresh noise: one more draw from the guided distribution, not an approximation
# of the ODE solution x_ref, so its fraction exceeds 1.
EULER_FRACTION = {
    "stride_dpmpp_2m": (0.63, 0.71), "stride_dpmpp_3m": (0.6, 0.76), "stride_unipc": (0.5, 0.68),
    "stride_unipc_bh2": (0.43, 0.36), "stride_ddim_dualfast": (0.67, 0.83), "stride_dpmpp_2m_dualfast": (0.98, 0.56),
    "stride_unipc_dualfast": (0.68, 0.25), "stride_dpmpp_2m_hb": (0.38, 0.86), "stride_plms_hb": (0.57, 0.83),
    "stride_ghvb": (0.26, 0.64), "stride_dpmpp_2m_ts": (0.83, 0.72), "stride_flowturbo": (0.62, 0.29),
    "stride_mixed_sde": (1.83, 2.48)}
# stride_mixed_sde: its SDE steps draw fresh noise from the seed, so its sample is one more draw from the guided
# distribution, near x_ref but not an approximation of the ODE solution x_ref itself (it measures 0.15-0.37).
SDE_BOUND = 0.8


# The method each stride_* name must be told from (besides Euler): its base solver, or for a base solver the next
# lower-order one.
NAME_BASES = {"stride_dpmpp_2m": "ddim", "stride_dpmpp_3m": "stride_dpmpp_2m", "stride_unipc": "stride_dpmpp_2m",
              "stride_unipc_bh2": "stride_unipc", "stride_ddim_dualfast": "ddim",
              "stride_dpmpp_2m_dualfast": "stride_dpmpp_2m", "stride_unipc_dualfast": "stride_unipc_bh2",
              "stride_dpmpp_2m_hb": "stride_dpmpp_2m", "stride_plms_hb": "ipndm", "stride_ghvb": "ipndm",
              "stride_dpmpp_2m_ts": "stride_dpmpp_2m", "stride_flowturbo": "heun", "stride_mixed_sde": "euler"}


# The same per SAMPLER node with NODE_OPTIONS (measured the same way). TimeShift on DPM-Solver++ 3M is worse than
# Euler at 10 steps on the EPS oracle (0.136 vs 0.122).
NODE_EULER_FRACTION = {
    "StrideSamplerDPMPP": (0.6, 0.82), "StrideSamplerUniPC": (0.38, 0.35), "StrideSamplerDualFast": (0.68, 0.25),
    "StrideSamplerHeavyBall": (0.57, 0.83), "StrideSamplerGHVB": (0.43, 0.46), "StrideSamplerTimeShift": (1.14, 0.76),
    "StrideSamplerFlowTurbo": (0.56, 0.29), "StrideSamplerMixedSDE": (1.9, 1.5)}  # SDE: ComfyUI 0.33's noise
# sampler draws other noise than 0.3.75's (measured 0.15 / 0.14 on 0.3.75, 0.21 / 0.20 on 0.33)


@pytest.fixture(scope="module")
def bridge(stride):
    return stride("nodes.sampler_bridge")


@pytest.fixture(scope="module")
def mixture(stride):
    return stride("nodes.oracle_model").load_mixture()


@pytest.fixture(scope="module")
def model_sampling(oracle_model):
    return lambda model: oracle_model(model.split("_")[1]).get_model_object("model_sampling")


@pytest.fixture(scope="module")
def reference(model_sampling, mixture):
    """reference(model) -> x_ref of a full run with the seed's noise (cached); reference(model, sigma_start, latent,
    seed) -> x_ref of a partial run from the input latent: its start state solved exactly to sigma_min."""
    cache = {}

    def ref(model, sigma_start=None, latent=None, seed=SEED):
        ms = model_sampling(model)
        noise = comfy.sample.prepare_noise(torch.zeros(len(LABELS), 4, 8, 8), seed)
        if latent is None:
            if model not in cache:
                sigma_start = comfy.samplers.calculate_sigmas(ms, SCHEDULER[model], STEPS)[0]
                cache[model] = oracle_reference(mixture, ms, sigma_start, noise, LABELS, CFG, rtol=1e-7)
            return cache[model]
        alpha = alpha_of(ms)
        x = ms.noise_scaling(torch.tensor([sigma_start], dtype=torch.float64), noise.double(), latent.double())
        denoiser = lambda x_, s: mixture.guided_denoise(x_, s, alpha(s), torch.tensor(LABELS), CFG)
        return host.stride("samplers.reference").reference_sample(denoiser, x, sigma_start, float(ms.sigma_min),
                                                                  1e-7, 1e-7)
    return ref


def err(x, x_ref, mixture):
    """The worst image's RMSE against x_ref, in data standard deviations."""
    return error_vs_reference(x, x_ref, mixture.data_std()).max().item()


# --- prompt building ------------------------------------------------------------------------------------------------

def base_prompt(model):
    """The demo model for digits 3 and 7 (batch 2), a CFG guider, the STEPS-step schedule and the seeded noise."""
    return {
        "m": {"class_type": "StrideDemoModel", "inputs": {"model": model, "digits": DIGITS, "repeats": 1,
                                                          "shift": 1.0, "zero_terminal_snr": False}},
        "guider": {"class_type": "CFGGuider", "inputs": {"model": ["m", 0], "positive": ["m", 1], "negative": ["m", 2],
                                                         "cfg": CFG}},
        "sigmas": {"class_type": "BasicScheduler", "inputs": {"model": ["m", 0], "scheduler": SCHEDULER[model],
                                                              "steps": STEPS, "denoise": 1.0}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": SEED}},
    }


def ksampler(model, name, latent=("m", 3), seed=SEED, denoise=1.0):
    return {"class_type": "KSampler", "inputs": {
        "model": ["m", 0], "positive": ["m", 1], "negative": ["m", 2], "latent_image": list(latent), "seed": seed,
        "steps": STEPS, "cfg": CFG, "sampler_name": name, "scheduler": SCHEDULER[model], "denoise": denoise}}


def custom(sampler, sigmas=("sigmas", 0), latent=("m", 3), noise=("noise", 0)):
    return {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": list(noise), "guider": ["guider", 0], "sampler": list(sampler), "sigmas": list(sigmas),
        "latent_image": list(latent)}}


def sampler_node(node_class, name, **options):
    """A SAMPLER node with its schema's defaults and the given options."""
    required = node_class(name).INPUT_TYPES()["required"]
    return {"class_type": name, "inputs": {**{k: v[1]["default"] for k, v in required.items()}, **options}}


def capture(prompt, **sources):
    """Add a StrideTestCapture per key=(node id, output index)."""
    for key, (node, index) in sources.items():
        prompt["cap_" + key] = {"class_type": "StrideTestCapture", "inputs": {"key": key, "latent": [node, index]}}
    return prompt


# --- registration ---------------------------------------------------------------------------------------------------

def test_stride_names_are_registered_once_in_both_lists(bridge, node_class):
    import comfy.k_diffusion.sampling as kds
    names = list(bridge.KSAMPLERS)
    lists = lambda: (comfy.samplers.KSAMPLER_NAMES, comfy.samplers.SAMPLER_NAMES,
                     node_class("KSampler").INPUT_TYPES()["required"]["sampler_name"][0],  # V1: (options, ...)
                     node_class("KSamplerSelect").INPUT_TYPES()["required"]["sampler_name"][1]["options"])  # V3
    before = [list(options) for options in lists()]
    bridge.register_ksampler_names()
    bridge.register_ksampler_names()
    for options, old in zip(lists(), before):
        assert options == old  # idempotent: nothing added or moved
        assert all(options.count(name) == 1 for name in names)
    assert "euler" in lists()[3] and "uni_pc_bh2" in lists()[3]  # ComfyUI's own names are kept
    for name in names:  # KSampler resolves every name to the bridged sampler with its default options
        sampler = comfy.samplers.ksampler(name)
        fn, defaults = bridge.KSAMPLERS[name]
        assert getattr(kds, "sample_" + name).keywords == defaults and sampler.sampler_function.func.__wrapped__ is fn


# --- every sampler through KSampler and SamplerCustomAdvanced --------------------------------------------------------

def check_sample(x, x_ref, mixture, bound):
    """Batch 2, finite, and near the exact solution."""
    assert x.shape == (len(LABELS), 4, 8, 8) and torch.isfinite(x).all()
    assert err(x, x_ref, mixture) < bound


def name_cases():
    """Every registered stride_* name on both oracles."""
    for name in host.stride("nodes.sampler_bridge").KSAMPLERS:
        for model in MODELS:
            yield pytest.param(name, model, id=f"{name}-{model}")


@pytest.mark.parametrize("name,model", list(name_cases()))
def test_every_stride_name_runs_in_ksampler(run_prompt, reference, mixture, name, model):
    prompt = capture({**base_prompt(model), "ks": ksampler(model, name), "eu": ksampler(model, "euler"),
                      "base": ksampler(model, NAME_BASES[name])}, out=("ks", 0), euler=("eu", 0), base=("base", 0))
    got = run_prompt(prompt)[1]
    x, x_ref = got["out"], reference(model)
    assert x.shape == (len(LABELS), 4, 8, 8) and torch.isfinite(x).all()
    euler = err(got["euler"], x_ref, mixture)
    assert err(x, x_ref, mixture) < EULER_FRACTION[name][MODELS.index(model)] * euler
    assert rel(x, got["base"]) > 5e-3 and rel(x, got["euler"]) > 5e-3  # told from its base and from Euler


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("node", list(NODE_OPTIONS))
def test_every_sampler_node_runs_in_sampler_custom_advanced(node_class, run_prompt, reference, mixture, node, model):
    prompt = {**base_prompt(model), "s": sampler_node(node_class, node, **NODE_OPTIONS[node]), "sca": custom(("s", 0)),
              "sel": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}, "eu": custom(("sel", 0))}
    captured = run_prompt(capture(prompt, out=("sca", 0), denoised=("sca", 1), euler=("eu", 0)))[1]
    bound = SDE_BOUND if node == "StrideSamplerMixedSDE" else BOUND
    x_ref = reference(model)
    check_sample(captured["out"], x_ref, mixture, bound)
    check_sample(captured["denoised"], x_ref, mixture, bound)  # the last model prediction
    euler = err(captured["euler"], x_ref, mixture)
    assert err(captured["out"], x_ref, mixture) < NODE_EULER_FRACTION[node][MODELS.index(model)] * euler
    assert rel(captured["out"], captured["euler"]) > 5e-3


# Every option of every SAMPLER node, set away from its default (on the model where it acts: the half-log-SNR
# choice only matters on flow models; plms_order only with the plms base).
OPTION_CASES = [
    ("StrideSamplerDPMPP", {}, "order", 3, "oracle_eps"),
    ("StrideSamplerDPMPP", {}, "half_log_snr", "ve", "oracle_flow"),
    ("StrideSamplerUniPC", {}, "order", 2, "oracle_eps"), ("StrideSamplerUniPC", {}, "variant", "bh2", "oracle_eps"),
    ("StrideSamplerUniPC", {}, "corrector", False, "oracle_eps"),
    ("StrideSamplerUniPC", {}, "lower_order_final", False, "oracle_eps"),
    ("StrideSamplerUniPC", {}, "half_log_snr", "ve", "oracle_flow"),
    ("StrideSamplerDualFast", {}, "base", "unipc_bh2", "oracle_eps"),
    ("StrideSamplerDualFast", {}, "strength", 1.0, "oracle_eps"),
    ("StrideSamplerDualFast", {}, "reference", "first", "oracle_eps"),
    ("StrideSamplerHeavyBall", {}, "base", "plms", "oracle_eps"),
    ("StrideSamplerHeavyBall", {}, "beta", 0.5, "oracle_eps"),
    ("StrideSamplerHeavyBall", {"base": "plms"}, "plms_order", 2, "oracle_eps"),
    ("StrideSamplerGHVB", {}, "order", 3.5, "oracle_eps"),
    ("StrideSamplerTimeShift", {}, "base", "dpmpp_3m", "oracle_eps"),
    ("StrideSamplerTimeShift", {}, "window", 0.6, "oracle_eps"),
    ("StrideSamplerTimeShift", {}, "cutoff", 0.3, "oracle_eps"),
    ("StrideSamplerFlowTurbo", {}, "heun_steps", 5, "oracle_flow"),
    ("StrideSamplerMixedSDE", {}, "eta", 0.3, "oracle_eps"),
    ("StrideSamplerMixedSDE", {}, "window_start", 0.1, "oracle_eps"),
    ("StrideSamplerMixedSDE", {}, "window_end", 0.6, "oracle_eps")]


def test_every_sampler_node_option_changes_the_output(node_class):
    covered = {(node, option) for node, _, option, _, _ in OPTION_CASES}
    for node in NODE_OPTIONS:
        assert {(node, k) for k in node_class(node).INPUT_TYPES()["required"]} <= covered, node
    demos = {}
    for node, base, option, value, model in OPTION_CASES:
        if model not in demos:
            with torch.inference_mode():
                demos[model] = node_class("StrideDemoModel").execute(model, DIGITS, 1, 1.0, False).result
        m, pos, neg, latent = demos[model]
        sigmas = comfy.samplers.calculate_sigmas(m.get_model_object("model_sampling"), SCHEDULER[model], STEPS)
        defaults = {k: v[1]["default"] for k, v in node_class(node).INPUT_TYPES()["required"].items()}
        run = lambda options: direct(m, pos, neg, latent, node_class(node).execute(**options).result[0], sigmas)
        assert rel(run({**defaults, **base, option: value}), run({**defaults, **base})) > 1e-3, (node, option)


def direct(model, pos, neg, latent, sampler, sigmas):
    noise = comfy.sample.prepare_noise(latent["samples"], SEED)
    with torch.inference_mode():
        return comfy.sample.sample_custom(model, noise, CFG, sampler, sigmas, pos, neg, latent["samples"], seed=SEED,
                                          disable_pbar=True)


# --- parity with ComfyUI's own samplers, through the real sampling path (float32) ------------------------------------

def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("model,ours,theirs", [
    ("oracle_eps", "stride_dpmpp_2m", "dpmpp_2m"),
    ("oracle_flow", ("StrideSamplerDPMPP", {"order": 2, "half_log_snr": "ve"}), "dpmpp_2m"),  # -log sigma on flow too
    ("oracle_eps", ("StrideSamplerGHVB", {"order": 4.0}), "ipndm"),
    ("oracle_flow", ("StrideSamplerGHVB", {"order": 4.0}), "ipndm")])
def test_parity_with_comfyui_samplers(node_class, run_prompt, model, ours, theirs):
    prompt = base_prompt(model)
    if isinstance(ours, str):  # both names through the plain KSampler
        prompt.update(a=ksampler(model, ours), b=ksampler(model, theirs))
    else:
        prompt.update(s=sampler_node(node_class, ours[0], **ours[1]), a=custom(("s", 0)),
                      sel={"class_type": "KSamplerSelect", "inputs": {"sampler_name": theirs}}, b=custom(("sel", 0)))
    captured = run_prompt(capture(prompt, a=("a", 0), b=("b", 0)))[1]
    assert rel(captured["a"], captured["b"]) < 1e-4


def test_flow_models_get_the_flow_half_log_snr(node_class, run_prompt):
    """The bridge hands a flow model's Param to the solver: with half_log_snr 'model' DPM-Solver++(2M) steps in
    log(alpha/sigma), a different algorithm from ComfyUI's dpmpp_2m (-log sigma), while 've' matches it above."""
    prompt = base_prompt("oracle_flow")
    prompt.update(s=sampler_node(node_class, "StrideSamplerDPMPP", order=2), a=custom(("s", 0)),
                  sel={"class_type": "KSamplerSelect", "inputs": {"sampler_name": "dpmpp_2m"}}, b=custom(("sel", 0)))
    captured = run_prompt(capture(prompt, a=("a", 0), b=("b", 0)))[1]
    assert rel(captured["a"], captured["b"]) > 1e-2


# --- denoise < 1: KSampler's partial sigma list ----------------------------------------------------------------------

@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("name", ["stride_dpmpp_2m", "stride_unipc_bh2", "stride_ghvb", "stride_flowturbo"])
def test_partial_denoise_follows_the_partial_sigma_list(model_sampling, run_prompt, reference, mixture, name, model):
    """A full run (seed 1) is re-sampled with another seed at denoise 0.5 and at denoise 1: the partial run starts
    from the input at the middle of the schedule, so it ends near the input, and near the exact solution from that
    start; the full re-run forgets the input."""
    prompt = {**base_prompt(model), "first": ksampler(model, name, seed=1),
              "half": ksampler(model, name, latent=("first", 0), seed=2, denoise=0.5),
              "full": ksampler(model, name, latent=("first", 0), seed=2)}
    captured = run_prompt(capture(prompt, first=("first", 0), half=("half", 0), full=("full", 0)))[1]
    first, half, full = captured["first"], captured["half"], captured["full"]
    assert torch.isfinite(half).all() and half.shape == first.shape
    assert err(half, first.double(), mixture) < 0.5 * err(full, first.double(), mixture)
    # KSampler at denoise 0.5 runs the last STEPS steps of a 2 * STEPS schedule
    sigma_start = float(comfy.samplers.calculate_sigmas(model_sampling(model), SCHEDULER[model], 2 * STEPS)[STEPS])
    assert err(half, reference(model, sigma_start, latent=first, seed=2), mixture) < 0.1


# --- a sigma list split across two sampler nodes ---------------------------------------------------------------------

def split_prompt(node_class, model, node, options):
    """The unsplit run, and the same schedule split at step 3 across two SamplerCustomAdvanced (no new noise)."""
    prompt = {**base_prompt(model), "s": sampler_node(node_class, node, **options), "whole": custom(("s", 0)),
              "split": {"class_type": "SplitSigmas", "inputs": {"sigmas": ["sigmas", 0], "step": 3}},
              "off": {"class_type": "DisableNoise", "inputs": {}},
              "high": custom(("s", 0), sigmas=("split", 0)),
              "low": custom(("s", 0), sigmas=("split", 1), latent=("high", 0), noise=("off", 0))}
    return capture(prompt, whole=("whole", 0), split=("low", 0))


@pytest.mark.parametrize("model", MODELS)
def test_split_ddim_equals_the_unsplit_run(node_class, run_prompt, model):
    """DDIM keeps no history, so two halves are the same computation as one run (up to float32 rounding of the
    latent handed between the nodes)."""
    captured = run_prompt(split_prompt(node_class, model, "StrideSamplerDPMPP", {"order": 1}))[1]
    assert rel(captured["split"], captured["whole"]) < 1e-5


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("node,options", [
    ("StrideSamplerDPMPP", {"order": 3}), ("StrideSamplerUniPC", {"variant": "bh2"}), ("StrideSamplerDualFast", {}),
    ("StrideSamplerGHVB", {}), ("StrideSamplerTimeShift", {}), ("StrideSamplerFlowTurbo", {})])
def test_split_multistep_samplers_stay_accurate(node_class, run_prompt, reference, mixture, model, node, options):
    """The second node restarts its history (a first-order warm-up step), which costs some accuracy, no more."""
    captured = run_prompt(split_prompt(node_class, model, node, options))[1]
    assert torch.isfinite(captured["split"]).all()
    whole, split = (err(captured[k], reference(model), mixture) for k in ("whole", "split"))
    assert split < 2 * whole + 0.05


# --- clear errors ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("node,options,flip,error,words", [
    ("StrideSamplerMixedSDE", {"window_start": 0.5, "window_end": 0.5}, False, RuntimeError,
     r"window_end \(0.5\) must exceed window_start \(0.5\)"),
    ("StrideSamplerDPMPP", {"order": 4}, False, ValueError,
     "Value 4 bigger than max of 3', 'details': 'order'"),  # ComfyUI's validation of the node's range
    ("StrideSamplerUniPC", {}, True, RuntimeError, "Stride unipc: sigmas must decrease strictly"),
    ("StrideSamplerGHVB", {}, True, RuntimeError, "Stride ghvb: sigmas must decrease strictly")])
def test_bad_options_are_clear_errors(node_class, run_prompt, node, options, flip, error, words):
    prompt = {**base_prompt("oracle_eps"), "s": sampler_node(node_class, node, **options),
              "flip": {"class_type": "FlipSigmas", "inputs": {"sigmas": ["sigmas", 0]}},
              "sca": custom(("s", 0), sigmas=("flip" if flip else "sigmas", 0))}
    with pytest.raises(error, match=words):
        run_prompt(capture(prompt, out=("sca", 0)))


def test_a_non_finite_sample_is_a_clear_error(stride, bridge):
    sample = bridge.bridged(stride("samplers.multistep").sample_dpmpp, "x")
    x, sigmas = torch.randn(2, 4, 8, 8), torch.tensor([2.0, 1.0, 0.5, 0.0])
    # a one-sigma list is no step: the input comes back unchanged (as from ComfyUI's own samplers); empty is refused
    assert torch.equal(sample(lambda x, sigma: torch.zeros_like(x), x, sigmas[:1], param="ve"), x)
    with pytest.raises(ValueError, match="sigmas must be a non-empty 1-D list"):
        sample(lambda x, sigma: torch.zeros_like(x), x, sigmas[:0], param="ve")
    assert torch.equal(sample(lambda x, sigma: torch.zeros_like(x), x, sigmas, param="ve"), torch.zeros_like(x))
    with pytest.raises(bridge.SampleNotFinite, match=r"Stride x: the sample is not finite \(NaN/inf\)"):
        sample(lambda x, sigma: torch.full_like(x, float("nan")), x, sigmas, param="ve")


# --- a fresh server process ------------------------------------------------------------------------------------------

def test_a_fresh_server_lists_and_runs_a_stride_name(comfy_server, bridge, run_prompt, reference, mixture):
    """A new ComfyUI process (as after a restart) offers the stride_* names once each, and a saved prompt using
    one runs there to the same latent as in this process."""
    for node in ("KSampler", "KSamplerSelect"):
        spec = get(f"{comfy_server}/object_info/{node}")[node]["input"]["required"]["sampler_name"]
        options = spec[0] if isinstance(spec[0], list) else spec[1]["options"]
        assert all(options.count(name) == 1 for name in bridge.KSAMPLERS), node
    prompt = {**base_prompt("oracle_eps"), "ks": ksampler("oracle_eps", "stride_unipc_bh2")}
    saved = {**prompt, "save": {"class_type": "SaveLatent", "inputs": {"samples": ["ks", 0],
                                                                        "filename_prefix": "stride_test"}}}
    prompt_id = post_json(f"{comfy_server}/prompt", {"prompt": saved, "client_id": "pytest"})["prompt_id"]
    (file,) = wait_for_history(comfy_server, prompt_id)["outputs"]["save"]["latents"]
    served = safetensors.torch.load(get(f"{comfy_server}/view?" + urllib.parse.urlencode(file)))["latent_tensor"]
    local = run_prompt(capture(prompt, out=("ks", 0)))[1]["out"]
    assert rel(served, local) < 1e-6 and err(served, reference("oracle_eps"), mixture) < BOUND
