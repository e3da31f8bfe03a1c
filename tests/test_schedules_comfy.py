"""Schedule optimizers in the real ComfyUI: each optimizer node through the executor on the exact EPS and flow
oracles (and LD3 through a trained UNet's real weights), the calibration store (reuse, another model, a stale
file, weight patches), the schedule text reproduced exactly in a fresh ComfyUI server, denoise < 1 and split
sigmas, and clear errors for bad input."""
import json
import logging

import pytest
import torch

from comfy_server import post_json, wait_for_history

SEED, CFG, STEPS = 3, 3.0, 4
OPTIMIZERS = {  # node: (budget, extra inputs) sized for a quick run
    "StrideScheduleGITS": (30, {"coeff": 1.15}),
    "StrideScheduleAYS": (161, {"initial": "auto"}),
    "StrideScheduleLD3": (80, {"initial": "auto"}),
    "StrideScheduleEvolution": (60, {"initial": "auto", "population": 4}),
}


@pytest.fixture(autouse=True)
def store(calibration_store):
    """A fresh calibration folder for each test."""
    return calibration_store


def demo(model, digits="37"):
    return {"class_type": "StrideDemoModel", "inputs": {"model": model, "digits": digits, "repeats": 1, "shift": 1.0,
                                                          "zero_terminal_snr": False}}


def optimizer(node, model_ref="m", steps=STEPS, denoise=1.0, sampler="dpmpp_2m"):
    budget, extra = OPTIMIZERS[node]
    return {"class_type": node, "inputs": {
        "model": [model_ref, 0], "positive": [model_ref, 1], "negative": [model_ref, 2], "latent_image": [model_ref, 3],
        "cfg": CFG, "sampler_name": sampler, "steps": steps, "budget": budget, "samples": 2, "seed": SEED,
        "denoise": denoise, **extra}}


def sample_with(sigmas_ref, key, sampler="dpmpp_2m", add_noise=True, latent=("m", 3)):
    return {
        f"sel{key}": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": sampler}},
        f"sc{key}": {"class_type": "SamplerCustom", "inputs": {
            "model": ["m", 0], "add_noise": add_noise, "noise_seed": SEED, "cfg": CFG, "positive": ["m", 1],
            "negative": ["m", 2], "sampler": [f"sel{key}", 0], "sigmas": list(sigmas_ref), "latent_image": list(latent)}},
        f"cap{key}": {"class_type": "StrideTestCapture", "inputs": {"key": key, "latent": [f"sc{key}", 0]}},
    }


def ui_sigmas(outputs, node_id):
    return outputs[node_id]["stride_sigmas"]


@pytest.mark.parametrize("model", ["oracle_eps", "oracle_flow"])
@pytest.mark.parametrize("node", list(OPTIMIZERS))
def test_optimizer_runs_in_the_executor_then_comes_from_the_store(run_prompt, caplog, store, model, node):
    prompt = {"m": demo(model), "o": optimizer(node), **sample_with(("o", 0), "x")}
    with caplog.at_level(logging.INFO):
        outputs, captured = run_prompt(prompt)
    sigmas = ui_sigmas(outputs, "o")
    assert len(sigmas) == STEPS + 1 and sigmas[-1] == 0.0
    assert all(a > b for a, b in zip(sigmas, sigmas[1:]))
    top = 1.0 if model == "oracle_flow" else pytest.approx(14.6146, rel=1e-4)
    assert sigmas[0] == top  # starts from the model's sigma_max, as the sampler's noise does
    assert torch.isfinite(captured["x"]).all()
    saved = list(store.glob("*.safetensors"))
    assert len(saved) == 1
    assert any("calibration of up to" in r.getMessage() for r in caplog.records)  # the cost estimate, before
    caplog.clear()
    with caplog.at_level(logging.INFO):  # a new executor: nothing cached but the store
        again, _ = run_prompt(prompt)
    assert ui_sigmas(again, "o") == sigmas
    assert any("reused" in r.getMessage() for r in caplog.records)
    assert not any("calibration of up to" in r.getMessage() for r in caplog.records)


def test_gits_reuses_its_cost_matrix_for_other_step_counts(run_prompt, caplog, store):
    prompt = {"m": demo("oracle_flow"), "a": optimizer("StrideScheduleGITS", steps=3),
              "b": optimizer("StrideScheduleGITS", steps=6),
              "pa": {"class_type": "StrideSigmaPreview", "inputs": {"sigmas": ["a", 0]}},
              "pb": {"class_type": "StrideSigmaPreview", "inputs": {"sigmas": ["b", 0]}}}
    with caplog.at_level(logging.INFO):
        outputs, _ = run_prompt(prompt)
    assert len(ui_sigmas(outputs, "a")) == 4 and len(ui_sigmas(outputs, "b")) == 7
    assert sum("calibration of up to" in r.getMessage() for r in caplog.records) == 1
    assert len(list(store.glob("*.safetensors"))) == 1


def test_denoise_and_split_sigmas(run_prompt):
    """denoise 0.5 keeps the last half of the full schedule; sampling the split halves in two nodes equals one run."""
    prompt = {"m": demo("oracle_eps"), "full": optimizer("StrideScheduleGITS", steps=6),
              "half": optimizer("StrideScheduleGITS", steps=6, denoise=0.5),
              "ph": {"class_type": "StrideSigmaPreview", "inputs": {"sigmas": ["half", 0]}},
              "split": {"class_type": "SplitSigmas", "inputs": {"sigmas": ["full", 0], "step": 2}},
              **sample_with(("full", 0), "whole", sampler="euler"),
              **sample_with(("split", 0), "first", sampler="euler"),
              **sample_with(("split", 1), "second", sampler="euler", add_noise=False, latent=("scfirst", 0))}
    outputs, captured = run_prompt(prompt)
    full, half = ui_sigmas(outputs, "full"), ui_sigmas(outputs, "half")
    assert half == full[-4:]
    assert torch.allclose(captured["second"], captured["whole"], atol=1e-5)


def run_optimizer(node_class, node, model="oracle_flow", steps=STEPS, **overrides):
    """(sigmas, text) of an optimizer node executed in-process on a demo model."""
    m, pos, neg, latent = node_class("StrideDemoModel").execute(model, "37", 1, 1.0, False).result
    budget, extra = OPTIMIZERS[node]
    inputs = dict(cfg=CFG, sampler_name="dpmpp_2m", steps=steps, budget=budget, samples=2, seed=SEED, denoise=1.0,
                  **extra)
    inputs.update(overrides)
    with torch.inference_mode():
        return node_class(node).execute(m, pos, neg, latent, **inputs).result


def test_schedule_text_reproduces_exactly_in_a_fresh_comfyui(node_class, comfy_server):
    sigmas, text = run_optimizer(node_class, "StrideScheduleEvolution")
    meta = json.loads(text)
    assert meta["method"] == "evolution" and meta["solver"] == "dpmpp_2m" and meta["steps"] == STEPS
    assert meta["calibration"]["evaluations"] <= OPTIMIZERS["StrideScheduleEvolution"][0]
    fresh = {"t": {"class_type": "StrideScheduleFromText", "inputs": {"schedule": text, "steps": 0, "denoise": 1.0}},
             "p": {"class_type": "StrideSigmaPreview", "inputs": {"sigmas": ["t", 0]}}}
    prompt_id = post_json(f"{comfy_server}/prompt", {"prompt": fresh})["prompt_id"]
    history = wait_for_history(comfy_server, prompt_id)
    assert history["outputs"]["p"]["stride_sigmas"] == [float(s) for s in sigmas]  # bit for bit, through JSON


def test_schedule_text_resamples_and_slices(node_class):
    sigmas, text = run_optimizer(node_class, "StrideScheduleGITS", model="oracle_eps", steps=6)
    from_text = node_class("StrideScheduleFromText").execute
    assert torch.equal(from_text(text, 0, 1.0).result[0], sigmas)
    assert torch.equal(from_text(text, 0, 0.5).result[0], sigmas[-4:])
    longer = from_text(text, 12, 1.0).result[0]
    assert len(longer) == 13 and longer[0] == sigmas[0] and longer[-2] == pytest.approx(float(sigmas[-2]))


def test_bad_inputs_get_clear_errors(node_class, oracle_model):
    with pytest.raises(ValueError, match="steps must be a whole number >= 1"):
        run_optimizer(node_class, "StrideScheduleAYS", steps=0)
    with pytest.raises(ValueError, match="too small to optimize; one sweep of 4 steps needs at least"):
        run_optimizer(node_class, "StrideScheduleAYS", budget=40)
    with pytest.raises(ValueError, match="too small to optimize"):
        run_optimizer(node_class, "StrideScheduleGITS", budget=3)
    with pytest.raises(ValueError, match="too small to optimize"):
        run_optimizer(node_class, "StrideScheduleEvolution", budget=20)
    from_text = node_class("StrideScheduleFromText").execute
    with pytest.raises(ValueError, match="leave the model's range"):
        from_text("14.6, 3.0, 0.5, 0", 0, 1.0, oracle_model("flow"))
    with pytest.raises(ValueError, match="must decrease strictly"):
        from_text("1.0, 3.0, 0", 0, 1.0)


def test_a_schedule_from_another_model_is_reported(node_class, caplog):
    _, text = run_optimizer(node_class, "StrideScheduleGITS", model="oracle_eps")
    unet = node_class("StrideDemoModel").execute("unet_small", "37", 1, 1.0, False).result[0]
    with caplog.at_level(logging.WARNING):
        node_class("StrideScheduleFromText").execute(text, 0, 1.0, unet)
    assert any("optimized for another model" in r.getMessage() for r in caplog.records)


def test_store_reports_other_models_and_stale_files(stride, oracle_model, store, caplog):
    st = stride("nodes.calibration_store")
    flow, other = oracle_model("flow"), oracle_model("flow", shift=2.0)
    fp, fp_other = st.fingerprint(flow), st.fingerprint(other)
    assert fp == st.fingerprint(oracle_model("flow")) and fp["id"] != fp_other["id"]
    settings = {"steps": 4}
    st.save("test", settings, fp_other, {"sigmas": torch.ones(3)})
    with caplog.at_level(logging.INFO):
        assert st.find("test", settings, fp) is None
    assert any("made for another model (sampling differ)" in r.getMessage() for r in caplog.records)
    path = st.save("test", settings, fp, {"sigmas": torch.ones(3)})
    tensors, meta, found = st.find("test", settings, fp)
    assert found == path and torch.equal(tensors["sigmas"], torch.ones(3)) and meta["settings"] == settings
    assert st.find("test", {"steps": 5}, fp) is None
    from safetensors.torch import save_file  # an older format under the same name: reported, not used
    save_file({"sigmas": torch.ones(3)}, path, metadata={"stride": json.dumps({**meta, "version": 0})})
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert st.find("test", settings, fp) is None
    assert any("is stale" in r.getMessage() for r in caplog.records)


def test_fingerprint_sees_weights_and_weight_patches(stride, node_class):
    st = stride("nodes.calibration_store")
    small = node_class("StrideDemoModel").execute("unet_small", "3", 1, 1.0, False).result[0]
    large = node_class("StrideDemoModel").execute("unet_large", "3", 1, 1.0, False).result[0]
    fp = st.fingerprint(small)
    assert st.fingerprint(large)["weights"] != fp["weights"]
    key = next(k for k in small.model.state_dict() if k.endswith(".weight") and k.startswith("diffusion_model."))
    patched = small.clone()
    patched.add_patches({key: (torch.full_like(small.model.state_dict()[key], 0.01),)}, 0.5)
    changed = st.fingerprint(patched)
    assert changed["patches"] != fp["patches"] and changed["weights"] == fp["weights"] and changed["id"] != fp["id"]
    stronger = small.clone()
    stronger.add_patches({key: (torch.full_like(small.model.state_dict()[key], 0.01),)}, 0.8)
    assert st.fingerprint(stronger)["patches"] != changed["patches"]  # the strength counts


def test_ld3_backpropagates_through_a_trained_unet(node_class):
    """ComfyUI loads weights in inference mode; LD3 swaps in ordinary copies while it runs, then puts them back."""
    with torch.inference_mode():  # as the executor loads them
        m, pos, neg, latent = node_class("StrideDemoModel").execute("unet_small", "37", 1, 1.0, False).result
    params = list(m.model.diffusion_model.parameters())
    assert all(p.is_inference() for p in params)
    with torch.inference_mode():
        sigmas, text = node_class("StrideScheduleLD3").execute(m, pos, neg, latent, CFG, "dpmpp_2m", STEPS, 100, 2,
                                                               SEED, 1.0, "auto").result
    info = json.loads(text)["calibration"]
    assert info["iterations"] >= 2 and info["loss"] < info["initial_loss"]
    after = list(m.model.diffusion_model.parameters())
    assert len(after) == len(params) and all(a is b for a, b in zip(after, params))


def test_gits_metric_changes_the_costs_and_is_stored_apart(node_class, store):
    """metric l2 (GITS's reference: unsquared L2 norm per image) and mse (Stride's variant) are different cost
    matrices, stored under different settings; on the guided flow oracle they pick different 6-step paths."""
    with torch.inference_mode():
        model, pos, neg, latent = node_class("StrideDemoModel").execute("oracle_flow", "37", 1, 1.0, False).result
        run = lambda metric: node_class("StrideScheduleGITS").execute(
            model, pos, neg, latent, CFG, "dpmpp_2m", 6, 60, 4, SEED, 1.0, 1.0, metric=metric).result[0]
        l2, mse = run("l2"), run("mse")
    assert len(list(store.glob("*.safetensors"))) == 2
    assert not torch.equal(l2, mse)


def test_ays_checks_its_schedule_with_the_users_sampler(stride, node_class, caplog):
    """AYS's objective is sampler-free; sampler_name decides between the optimized and the initial schedule on the
    calibration noises (the initial one kept, with a warning, when it lands closer with that sampler)."""
    check = stride("nodes.schedules").sampler_check
    common = stride("samplers.schedules.common")
    optimized, init = torch.tensor([3.0, 1.0, 0.0]), torch.tensor([3.0, 0.5, 0.0])
    target = torch.zeros(2, 4)

    class Ctx:
        x = torch.ones(2, 4)
        run = staticmethod(lambda name, sigmas, x: x * float(sigmas[1]) * (2.0 if name == "euler" else 0.1))
    with caplog.at_level(logging.WARNING):
        assert check(Ctx, "euler", optimized, init, target, "AYS") == (init, "initial")  # 1.0 * 2 vs 0.5 * 2
    assert any("with euler the optimized schedule lands further" in r.getMessage() for r in caplog.records)
    Ctx.run = staticmethod(lambda name, sigmas, x: x * (1.0 - float(sigmas[1])))
    assert check(Ctx, "euler", optimized, init, target, "AYS") == (optimized, "optimized")

    def broke(name, sigmas, x):
        raise common.BudgetExceeded("no budget")
    Ctx.run = staticmethod(broke)
    assert check(Ctx, "euler", optimized, init, target, "AYS") == (optimized, "optimized")
    sigmas, text = run_optimizer(node_class, "StrideScheduleAYS", model="oracle_eps", steps=4)
    assert json.loads(text)["calibration"]["kept"] in ("optimized", "initial")
