"""The "compare samplers on my model" tool in the real PromptExecutor: one row per run, errors that match an
independent measurement against the oracle's exact reference, steps fitted to the NFE budget, clear errors
for bad lists, and diverged runs reported instead of raised."""
import math

import pytest
import torch

import comfy.sample
import comfy.samplers
from bench.reference import oracle_reference


def _prompt(model="oracle_eps", digits="0123456789", cfg=3.0, samplers="euler, stride_dpmpp_2m",
            schedulers="karras", nfes="4, 8", tolerance=1e-4):
    return {
        "1": {"class_type": "StrideDemoModel", "inputs": {"model": model, "digits": digits, "repeats": 1, "shift": 1.0,
                                                          "zero_terminal_snr": False}},
        "2": {"class_type": "StrideCompareSamplers", "inputs": {
            "model": ["1", 0], "positive": ["1", 1], "negative": ["1", 2], "latent_image": ["1", 3], "seed": 5,
            "cfg": cfg, "samplers": samplers, "schedulers": schedulers, "nfes": nfes,
            "reference_tolerance": tolerance}},
        "3": {"class_type": "StrideTestCapture", "inputs": {"key": "plot", "image": ["2", 1]}},
    }


def _rows(table):
    """The table's runs as dicts keyed by its header (the Markdown lines that start with a number)."""
    lines = [line for line in table.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def _run(run_prompt, **kwargs):
    outputs, captured = run_prompt(_prompt(**kwargs))
    return outputs["2"]["text"][0], captured["plot"]


@pytest.mark.parametrize("model", ["oracle_eps", "oracle_flow"])
def test_table_has_a_row_per_run_and_the_plot_is_an_image(run_prompt, model):
    table, plot = _run(run_prompt, model=model, digits="0123")
    rows = _rows(table)
    assert sorted((r["sampler"], r["scheduler"], r["NFE"]) for r in rows) == \
        sorted((s, "karras", n) for s in ("euler", "stride_dpmpp_2m") for n in ("4", "8"))
    assert all(r["counted NFE"] == r["NFE"] == r["steps"] for r in rows)  # one model call per step
    assert all(float(r["seconds"]) > 0 and float(r["error (x ref. std)"]) > 0 for r in rows)
    assert [r[""] for r in rows].count("**best**") == 2  # one per NFE, listed first
    assert rows[0][""] == "**best**" and rows[2][""] == "**best**"
    assert "standard deviation" in table and "batch 4" in table
    assert plot.shape[0] == 1 and plot.shape[3] == 3 and plot.shape[1] >= 300 and plot.shape[2] >= 500
    assert plot.dtype == torch.float32 and 0.0 <= plot.min() and plot.max() <= 1.0
    assert (plot < 0.9).any(dim=3).float().mean() > 0.01  # something is drawn on the white canvas


def test_errors_match_an_independent_measurement_against_the_exact_oracle(run_prompt, stride, oracle_model):
    cfg, seed = 3.0, 5
    table, _ = _run(run_prompt, cfg=cfg, samplers="euler, dpmpp_2m", nfes="4, 8, 16", tolerance=1e-6)
    rows = {(r["sampler"], int(r["NFE"])): float(r["error (x ref. std)"]) for r in _rows(table)}
    assert rows["euler", 4] > rows["euler", 8] > rows["euler", 16]
    # dpmpp_2m at 8 NFE measured here with ComfyUI's own sampling and the oracle's analytic reference.
    om = stride("nodes.oracle_model")
    patcher = oracle_model("eps")
    ms = patcher.get_model_object("model_sampling")
    labels = list(range(10))
    latent = torch.zeros(10, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    sigmas = comfy.samplers.calculate_sigmas(ms, "karras", 8)
    x = comfy.sample.sample_custom(patcher, noise, cfg, comfy.samplers.sampler_object("dpmpp_2m"), sigmas,
                                   om.digit_conditioning(labels), om.digit_conditioning([-1]), latent, seed=seed,
                                   disable_pbar=True)
    x_ref = oracle_reference(om.load_mixture(), ms, sigmas[0], noise, labels, cfg, rtol=1e-9)
    expected = ((x.double() - x_ref).flatten(1).pow(2).mean(1).sqrt() / x_ref.std()).mean().item()
    assert expected > 0.01  # a real error to compare, far above the reference tolerance
    assert rows["dpmpp_2m", 8] == pytest.approx(expected, rel=6e-3)  # the table prints 3 digits


def test_steps_are_fitted_to_the_nfe_budget(run_prompt):
    table, _ = _run(run_prompt, digits="01", samplers="heun, stride_flowturbo", nfes="4, 8")
    rows = {(r["sampler"], int(r["NFE"])): (int(r["steps"]), int(r["counted NFE"])) for r in _rows(table)}
    # heun: 2 calls per step but 1 on the last; flowturbo: 2 per Heun step (the first two), 1 per other step
    # and 1 for the final denoise, which is its last step.
    assert rows == {("heun", 4): (2, 3), ("heun", 8): (4, 7), ("stride_flowturbo", 4): (2, 3),
                    ("stride_flowturbo", 8): (6, 8)}


def test_fit_steps_finds_the_largest_step_count_within_the_budget(stride):
    fit_steps = stride("nodes.compare").fit_steps
    for cost, nfe, steps in [(lambda s: s, 6, 6), (lambda s: 2 * s - 1, 8, 4), (lambda s: 2 * s - 1, 7, 4),
                             (lambda s: s + 3, 8, 5), (lambda s: s + 3, 3, 1), (lambda s: 50, 8, 1)]:
        assert fit_steps(lambda s: {"steps": s, "nfe": cost(s)}, nfe)["steps"] == steps


@pytest.mark.parametrize("field,value,message", [
    ("samplers", "euler, eulr", "unknown sampler 'eulr'; choose from: euler, "),
    ("samplers", " , ", "list at least one sampler"),
    ("schedulers", "karas", "unknown scheduler 'karas'; choose from: simple, "),
    ("nfes", "4, 0", "NFE '0' is not a whole number"),
    ("nfes", "abc", "NFE 'abc' is not a whole number"),
    ("nfes", "", "list at least one NFE"),
])
def test_bad_lists_are_clear_errors(run_prompt, field, value, message):
    with pytest.raises(RuntimeError, match=message):
        run_prompt(_prompt(**{field: value}))


def test_diverged_runs_are_reported_not_raised(run_prompt):
    """At cfg 100 on the oracle ComfyUI's heun and uni_pc diverge; Stride's UniPC, with its divergence guard, does
    not (and is the best row)."""
    table, plot = _run(run_prompt, digits="0123", cfg=100.0, samplers="euler, heun, uni_pc, stride_unipc", nfes="7")
    rows = {r["sampler"]: r for r in _rows(table)}
    assert rows["heun"]["error (x ref. std)"] == rows["uni_pc"]["error (x ref. std)"] == "diverged"
    assert rows["heun"]["counted NFE"] == rows["uni_pc"]["counted NFE"] == "7"
    assert rows["stride_unipc"][""] == "**best**" and math.isfinite(float(rows["stride_unipc"]["error (x ref. std)"]))
    assert torch.isfinite(plot).all()


def test_table_and_plot_of_a_diverged_run(stride):
    compare = stride("nodes.compare")
    row = {"sampler": "uni_pc", "scheduler": "karras", "target": 4, "steps": 4, "nfe": 4, "seconds": 0.1,
           "error": math.nan, "median": math.nan}
    reference = {"x": None, "nfe": 80, "seconds": 1.0, "sigmas": torch.tensor([14.6, 0.03, 0.0])}
    table = compare.format_table([row], {14.6: reference}, 5.0, 0, 1, 1e-4)
    assert "| 4 | uni_pc | karras | 4 | 4 | diverged | diverged | 0.100 |  |" in table and "**best**" not in table
    plot = compare.plot_errors(compare.error_series([row]))
    assert plot.shape[0] == 1 and plot.shape[3] == 3 and torch.isfinite(plot).all()
