"""No Stride sampler diverges where Euler does not: on the exact EPS oracle at cfg 5.5 with 5 karras steps (a stiff
setting where ComfyUI's own dpmpp_2m, uni_pc_bh2 and heun end several data standard deviations away), every
`stride_*` KSampler name that needs no calibration stays near Euler through the real KSampler, and the divergence
guard (samplers/core.py) is what does it for the multistep ones."""
import pytest
import torch

import comfy.samplers
from bench import host
from bench.reference import error_vs_reference, oracle_reference

LABELS, SEED, STEPS, CFG = [3, 7], 5, 5, 5.5
STRIDE = ["stride_dpmpp_2m", "stride_dpmpp_3m", "stride_unipc", "stride_unipc_bh2", "stride_dpmpp_2m_hb",
           "stride_flowturbo", "stride_ddim_dualfast", "stride_dpmpp_2m_dualfast", "stride_unipc_dualfast",
           "stride_plms_hb", "stride_ghvb", "stride_dpmpp_2m_ts", "stride_mixed_sde"]


@pytest.fixture
def stiff(stride, run_prompt):
    """errors(names) -> {name: worst image's RMSE against the exact x_ref, in data standard deviations}."""
    import comfy.sample
    mixture = stride("nodes.oracle_model").load_mixture()
    ms = stride("nodes.oracle_model").build_oracle_model("eps").get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, "karras", STEPS)
    noise = comfy.sample.prepare_noise(torch.zeros(len(LABELS), 4, 8, 8), SEED)
    x_ref = oracle_reference(mixture, ms, sigmas[0], noise, LABELS, CFG, rtol=1e-7)

    def errors(names):
        prompt = {"m": {"class_type": "StrideDemoModel", "inputs": {"model": "oracle_eps", "digits": "37",
                                                                    "repeats": 1, "shift": 1.0,
                                                                    "zero_terminal_snr": False}}}
        for name in names:
            prompt[name] = {"class_type": "KSampler", "inputs": {
                "model": ["m", 0], "positive": ["m", 1], "negative": ["m", 2], "latent_image": ["m", 3],
                "seed": SEED, "steps": STEPS, "cfg": CFG, "sampler_name": name, "scheduler": "karras", "denoise": 1.0}}
            prompt[f"cap_{name}"] = {"class_type": "StrideTestCapture", "inputs": {"latent": [name, 0], "key": name}}
        got = run_prompt(prompt)[1]
        return {n: error_vs_reference(got[n], x_ref, mixture.data_std()).max().item() for n in names}
    return errors


def test_no_stride_sampler_diverges_where_euler_does_not(stiff):
    err = stiff(["euler", "dpmpp_2m", "heun"] + STRIDE)
    assert err["euler"] < 1.0 and err["dpmpp_2m"] > 3.0 and err["heun"] > 3.0  # the setting is stiff, Euler copes
    assert {n: e for n, e in err.items() if n in STRIDE and e > 2 * err["euler"]} == {}


def test_without_the_guard_they_diverge(stiff, stride, monkeypatch):
    monkeypatch.setattr(stride("samplers.core"), "GUARD", float("inf"))
    err = stiff(["euler", "stride_dpmpp_2m", "stride_unipc_bh2"])
    assert err["stride_dpmpp_2m"] > 3.0 and err["stride_unipc_bh2"] > 3.0
