"""The coverage matrix on this ComfyUI tree: every Stride feature on a tiny model of every family ComfyUI ships
(bench/families.py, built through comfy.supported_models), through KSampler and SamplerCustomAdvanced
(bench/coverage.py). Each cell runs to a finite result and either engaged (cache hits, unconditional passes skipped,
small-model calls, fitted values used) or refused with Stride's error naming the family or its latent and why; a
cell that runs without engaging and without saying so fails inside bench.coverage. Block caches are expected exactly
on the families whose own forward looks up ComfyUI's "dit" block replacement (read from the ComfyUI source, not from
Stride), whole-call caching with a logged reason on the other DiTs, attention units on UNets. The README's
"Supported model families" table is docs/coverage.md, which says what this matrix measures.

The calibrating features (schedule optimizers, calibrated solvers) run on one family per parameterization and latent
form (QUICK_CALIBRATED) to keep CI small, as `python -m bench.coverage --quick` does; without --quick it runs
them on every family.
"""
import inspect
import os
import re

import pytest
import torch

from bench import coverage, families

QUICK_CALIBRATED, CALIBRATING = coverage.QUICK_CALIBRATED, coverage.CALIBRATING  # what --quick runs
CORE = [f for f in coverage.FEATURES if f not in CALIBRATING]
CELLS = [(name, f) for name in (fam.name for fam in families.FAMILIES) for f in CORE] + \
    [(name, f) for name in QUICK_CALIBRATED for f in CALIBRATING]
BLOCK_FEATURES = ("step cache (first block)", "cache plan")
WRAPPER_FAILS = "own 'dit' block wrapper fails"  # a ComfyUI defect Stride detects (Kandinsky5 on 0.33.0)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_results = {}


@pytest.fixture(scope="module")
def folder():
    with coverage.calibration_folder() as path:
        yield path


def measured(name, feature):
    """The cell (run once per module; the family's model is built per cell from cached weights)."""
    if (name, feature) not in _results:
        _results[(name, feature)] = coverage.run_family(name, [feature])[feature]
    return _results[(name, feature)]


def comfy_source(name):
    """The source of the modules of the family's diffusion model (ComfyUI's, not Stride's)."""
    net = families.build(name).model.model.diffusion_model
    return "".join(inspect.getsource(inspect.getmodule(cls)) for cls in type(net).__mro__
                   if cls.__module__.startswith("comfy."))


def looks_up_dit_blocks(name):
    """Whether the family's diffusion model itself looks up patches_replace["dit"] (read from ComfyUI's source)."""
    return re.search(r"""patches_replace\.get\(\s*["']dit["']""", comfy_source(name)) is not None


def names_its_attention(name):
    """Whether the family's blocks tell the attention override which block runs (transformer_options
    block_type), so a plan can cache attention outputs (read from ComfyUI's source)."""
    return re.search(r"""["']block_type["']\]\s*=|["']block_type["']\s*:""", comfy_source(name)) is not None


@pytest.mark.parametrize("name,feature", CELLS)
def test_cell_engages_or_says_why(folder, name, feature):
    reason = families.unavailable(name)
    if reason:
        pytest.skip(reason)
    with torch.inference_mode(False):
        cell = measured(name, feature)
    assert cell.status in ("engaged", "whole-call", "refused"), cell
    if feature in BLOCK_FEATURES:
        unet = hasattr(families.build(name).model.model.diffusion_model, "input_blocks")  # SD-style UNet
        if unet and feature == "step cache (first block)":
            assert cell.status == "refused" and "UNet" in cell.measure, cell
        elif (unet or looks_up_dit_blocks(name) or (feature == "cache plan" and names_its_attention(name))) \
                and WRAPPER_FAILS not in cell.detail:
            assert cell.status == "engaged" and "blocks" in cell.measure, cell
        else:  # whole calls, and the log says why: no block lookup, or ComfyUI's own block wrapper fails
            assert cell.status == "whole-call" and "calls" in cell.measure, cell
            assert coverage.NO_BLOCKS in cell.detail, cell
    else:
        assert cell.status == "engaged", cell
    if cell.status == "engaged":
        numbers = [int(n) for n in re.findall(r"(\d+)/\d+", cell.measure)] or [1]
        assert max(numbers) > 0, cell  # an engaged cell measured something


def test_ld3_fits_a_comfyui_network(folder):
    """LD3 differentiates through the model: through Flux's blocks, which add into their residual stream in place,
    and (on newer trees) ComfyUI's kernels, with the weights frozen (older trees create them requiring grad)."""
    built = families.build("Flux dev")
    node = coverage.node("StrideScheduleLD3")
    sigmas, _ = node.execute(built.model, built.positive(), built.negative(), coverage.latent_input(built),
                             coverage.CFG, "dpmpp_2m", coverage.STEPS, budget=65, samples=1, seed=coverage.SEED,
                             denoise=1.0, initial="auto").result
    assert torch.isfinite(sigmas).all()


def test_ld3_refuses_a_model_it_cannot_differentiate(folder):
    """Cosmos Predict2 on newer trees runs a fused rotary kernel with no backward pass: LD3 refuses it with a clear
    error naming the kernel and what to use instead (it crashed deep in torch's backward); where the model
    differentiates (older trees), LD3 fits it."""
    reason = families.unavailable("Cosmos Predict2")
    if reason:
        pytest.skip(reason)
    built = families.build("Cosmos Predict2")
    run = lambda: coverage.node("StrideScheduleLD3").execute(
        built.model, built.positive(), built.negative(), coverage.latent_input(built), coverage.CFG, "euler",
        coverage.STEPS, budget=65, samples=1, seed=coverage.SEED, denoise=1.0, initial="auto").result[0]
    if "rms_rope_split_half" in comfy_source("Cosmos Predict2"):
        with pytest.raises(ValueError, match=r"Stride LD3: CosmosT2IPredict2 .* without a backward pass "
                                             r"\(comfy_kitchen\.rms_rope_split_half.*\).* GITS"):
            run()
    else:
        assert torch.isfinite(run()).all()


def table_of(text):
    """{family: {feature: cell text}} of the markdown table in `text` that starts with '| family |'."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    start = next(i for i, line in enumerate(lines) if line.startswith("| family |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != len(header):
            break
        rows[cells[0]] = dict(zip(header[1:], cells[1:]))
    return rows


def test_readme_shows_the_measured_table():
    """README's section is docs/coverage.md's table (printed by bench.coverage), and every cell this tree
    measured says what the table says (the same status; an 'engaged' cell engaged here)."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    with open(os.path.join(ROOT, "docs", "coverage.md")) as f:
        docs = f.read()
    section = readme.split("## Supported model families", 1)[1].split("\n## ", 1)[0]
    assert table_of(section) == table_of(docs)
    table = table_of(docs)
    assert set(table) == {f.name for f in families.FAMILIES}
    import comfyui_version  # only to pick this tree's entry of a cell where the trees differ
    for (name, feature), cell in _results.items():
        texts = coverage.cell_texts(table[name][feature])
        text = texts.get(comfyui_version.__version__, texts[""])
        assert text.split(":")[0] == cell.text().split(":")[0], (name, feature, text, cell)
