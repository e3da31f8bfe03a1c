"""The family x feature coverage matrix: every Stride feature on a tiny model of every family ComfyUI ships
(bench/families.py), through ComfyUI's own KSampler and SamplerCustomAdvanced paths, each cell reporting what the
feature did: "engaged" (with the measured reuse: cache hits, unconditional passes skipped, small-model calls, fitted
values used), "whole-call" (a block cache on a model without block replacement: whole calls cached, the log says
why), "refused" (a clear error naming the family and the cause) or "unavailable" (the family is not in this ComfyUI).

    python -m bench.coverage [--quick] [--json PATH] [--families "Flux dev,WAN 2.1 T2V"] [--markdown PATH]

prints the table (markdown) and writes docs/coverage.md with --markdown docs/coverage.md. The tests
(tests/test_coverage.py) run the same cells and check each one engaged or said why, and that the README's table
says what this program measures.
"""
import argparse
import contextlib
import json
import logging
import re
import sys
import time
from typing import NamedTuple

import torch

from .host import node

STEPS = 4
CFG = 3.0
SEED = 7
CALIBRATED_NAMES = ("stride_dc_solver", "stride_iia_dpmpp_2m", "stride_dpm_solver_v3")
SAMPLER_NODES = ("StrideSamplerDPMPP", "StrideSamplerUniPC", "StrideSamplerDualFast", "StrideSamplerHeavyBall",
                 "StrideSamplerGHVB", "StrideSamplerTimeShift", "StrideSamplerFlowTurbo", "StrideSamplerMixedSDE",
                 "StrideSamplerParaDiGMS", "StrideSamplerBottleneck")


class Cell(NamedTuple):
    status: str      # engaged | whole-call | refused | unavailable | skipped (not run by --quick) | failed
    measure: str     # what was measured ("6/16 blocks reused", "2/4 uncond skipped", ...) or the reason
    detail: str = ""  # the log line or error behind it

    def text(self):
        """The table's text: the status and what was measured (a refusal: the clause that says why)."""
        if self.status == "refused":
            parts = self.measure.split("; ")
            return "refused: " + next((p for p in parts if " is a " in p), parts[0]).replace("|", "/")
        if self.status == "whole-call":
            why = ("its ComfyUI block wrapper fails" if "own 'dit' block wrapper fails" in self.detail
                   else "no 'dit' block replacement in its ComfyUI model")
            return f"whole calls: {self.measure} ({why})"
        return {"engaged": f"engaged: {self.measure}", "unavailable": "not in this ComfyUI",
                "skipped": "not run (--quick)", "failed": f"FAILS: {self.measure}"}[self.status].replace("|", "/")


# --- the ComfyUI paths ---------------------------------------------------------------------------------------------

class Logs(logging.Handler):
    """The Stride log lines of one cell."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("Stride"):
            self.lines.append(message)

    def find(self, pattern):
        return [m for line in self.lines if (m := re.search(pattern, line))]


@contextlib.contextmanager
def captured():
    logs, root = Logs(), logging.getLogger()
    level = root.level
    root.addHandler(logs)
    root.setLevel(min(level, logging.INFO))
    try:
        yield logs
    finally:
        root.removeHandler(logs)
        root.setLevel(level)


def ksampler(built, model=None, sampler="euler", scheduler="simple", steps=STEPS, cfg=CFG):
    """ComfyUI's KSampler node path (comfy.sample.sample)."""
    import comfy.sample
    latent = built.latent()
    noise = comfy.sample.prepare_noise(latent, SEED)
    with torch.inference_mode():
        return comfy.sample.sample(model or built.model, noise, steps, cfg, sampler, scheduler, built.positive(),
                                   built.negative(), latent, seed=SEED, disable_pbar=True)


def advanced(built, sampler, sigmas=None, model=None, guider=None, cfg=CFG):
    """ComfyUI's SamplerCustomAdvanced path: a guider (CFGGuider unless given) sampling `sigmas`."""
    import comfy.sample
    import comfy.samplers
    model = model or built.model
    if guider is None:
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(built.positive(), built.negative())
        guider.set_cfg(cfg)
    if sigmas is None:
        sigmas = default_sigmas(model)
    latent = built.latent()
    noise = comfy.sample.prepare_noise(latent, SEED)
    with torch.inference_mode():
        return guider.sample(noise, latent, sampler, sigmas, seed=SEED, disable_pbar=True)


def default_sigmas(model, steps=STEPS):
    import comfy.samplers
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps).cpu()


def latent_input(built):
    return {"samples": built.latent()}


def finite(out):
    return bool(torch.isfinite(out).all())


def family_of(built):
    """How refusals and logs name a family: ComfyUI's supported_models class or model class."""
    return {type(built.model.model.model_config).__name__, type(built.model.model).__name__, built.family.name}


def refused(error, built):
    """A refusal counts when it is Stride's own error saying why: naming the family (its supported_models or model
    class), the form of its latent, or what of this run's schedule or settings the feature cannot take."""
    message = str(error)
    method, _, why = message.partition(": ")
    if not message.startswith("Stride") or len(why) < 30:
        raise AssertionError(f"{built.family.name}: an error that does not say which family and why: "
                             f"{type(error).__name__}: {message}") from error
    return Cell("refused", message.split(": ", 1)[-1][:160], message)


def short(message):
    """A refusal in a few words for the table: its method and its first clause."""
    method, _, why = message.partition(": ")
    clause = why.split(';')[0].split(', which')[0]
    if len(clause) > 70:  # cut at a word, and say so
        clause = clause[:70].rsplit(" ", 1)[0] + " ..."
    return f"{method.replace('Stride ', '')} refused ({clause})"


def different(a, b):
    return not torch.equal(a, b)


# --- the features --------------------------------------------------------------------------------------------------

def cell_ksampler_names(built, cache):
    """Every stride_* KSampler name (the calibrated ones: their own columns) through the KSampler path: finite, and
    not the euler result (the sampler's own update ran)."""
    import comfy.samplers
    names = [n for n in comfy.samplers.KSAMPLER_NAMES if n.startswith("stride_") and n not in CALIBRATED_NAMES]
    euler = cache.setdefault("euler", ksampler(built))
    ran, refusals, bases = [], [], []
    for name in names:
        with captured() as logs:
            try:
                out = ksampler(built, sampler=name)
            except ValueError as e:
                refusals.append(refused(e, built).detail)
                continue
        if not finite(out) or not different(out, euler):
            raise AssertionError(f"{built.family.name}: {name} ran without effect (finite {finite(out)})")
        if any("no calibration fits this run" in line for line in logs.lines):
            bases.append(name)  # a calibrated name with nothing calibrated: its base solver ran, and it said so
        else:
            ran.append(name)
    notes = [f"{n}: uncalibrated base, said why" for n in bases] + [short(r) for r in refusals]
    return Cell("engaged", f"{len(ran)}/{len(names)} samplers" + "".join(f"; {n}" for n in notes),
                ", ".join(ran) + "".join(f"\n{r}" for r in refusals))


def cell_sampler_nodes(built, cache):
    """Every Stride sampler node (defaults) through SamplerCustomAdvanced: finite and not the euler result."""
    import comfy.samplers
    euler = cache.setdefault("euler_advanced", advanced(built, comfy.samplers.sampler_object("euler")))
    euler8 = advanced(built, comfy.samplers.sampler_object("euler"), default_sigmas(built.model, 8))
    ran, refusals = [], []
    for name in SAMPLER_NODES:
        cls = node(name)
        schema = cls.GET_SCHEMA()
        options = {i.id: i.default for i in schema.inputs if getattr(i, "default", None) is not None}
        with captured():
            try:
                sampler = cls.execute(**options).result[0]
                # the bottleneck's default stages need a schedule longer than 4 steps to restart within
                steps = 8 if name == "StrideSamplerBottleneck" else STEPS
                out = advanced(built, sampler, default_sigmas(built.model, steps))
            except ValueError as e:
                refusals.append(refused(e, built).detail)
                continue
        if not finite(out) or not different(out, euler8 if steps == 8 else euler):
            raise AssertionError(f"{built.family.name}: {name} ran without effect (finite {finite(out)})")
        ran.append(name)
    notes = "".join(f"; {short(r)}" for r in refusals)
    return Cell("engaged", f"{len(ran)}/{len(SAMPLER_NODES)} sampler nodes{notes}",
                ", ".join(ran) + "".join(f"\n{r}" for r in refusals))


def skipped_passes(logs):
    return [(int(m[1]), int(m[2])) for m in logs.find(r"unconditional pass skipped in (\d+) of (\d+)")]


def cell_cfg_schedule(built, cache):
    """The interval CFG schedule as a MODEL patch (KSampler) and as a GUIDER (SamplerCustomAdvanced): the
    unconditional pass is skipped outside the interval in both."""
    import comfy.samplers
    with captured() as logs:
        patched = node("StrideCFGSchedule").execute(model=built.model, schedule="interval", start=0.3, end=0.8,
                                                     floor=1.0, points="0:1, 1:6", points_in="progress").result[0]
        a = ksampler(built, patched)
        guider = node("StrideCFGScheduleGuider").execute(
            model=built.model, positive=built.positive(), negative=built.negative(), cfg=CFG, schedule="interval",
            start=0.3, end=0.8, floor=1.0, points="0:1, 1:6", points_in="progress").result[0]
        b = advanced(built, comfy.samplers.sampler_object("euler"), guider=guider)
    runs = skipped_passes(logs)
    if not (finite(a) and finite(b)) or len(runs) != 2 or not all(s > 0 for s, _ in runs):
        raise AssertionError(f"{built.family.name}: CFG schedule did not skip ({runs}): {logs.lines}")
    return Cell("engaged", f"{runs[0][0]}/{runs[0][1]} uncond skipped", "; ".join(logs.lines))


def cell_raag(built, cache):
    """RAAG as a MODEL patch (KSampler) and a GUIDER (SamplerCustomAdvanced): its per-step scale changes the result
    against plain CFG at the same cfg."""
    import comfy.samplers
    euler = cache.setdefault("euler", ksampler(built))
    euler_adv = cache.setdefault("euler_advanced", advanced(built, comfy.samplers.sampler_object("euler")))
    with captured() as logs:
        a = ksampler(built, node("StrideRAAG").execute(model=built.model, max_guidance=18.0, alpha=144.0).result[0])
        guider = node("StrideRAAGGuider").execute(model=built.model, positive=built.positive(),
                                                  negative=built.negative(), max_guidance=18.0, alpha=144.0).result[0]
        b = advanced(built, comfy.samplers.sampler_object("euler"), guider=guider)
    if not (finite(a) and finite(b) and different(a, euler) and different(b, euler_adv)):
        raise AssertionError(f"{built.family.name}: RAAG had no effect")
    change = float((a - euler).norm() / euler.norm().clamp_min(1e-12))
    return Cell("engaged", f"guidance changed ({change:.0%} of the result)", "; ".join(logs.lines))


def cache_counts(logs, label):
    """(call hits, calls, block hits, block calls, text) of the runs `label` logged."""
    out = []
    for line in logs.lines:
        if m := re.match(rf"Stride {label}: (\d+) of (\d+) model calls", line):
            blocks = re.search(r"(\d+) of (\d+) block evaluations reused", line)
            out.append((int(m[1]), int(m[2]), int(blocks[1]) if blocks else 0, int(blocks[2]) if blocks else 0,
                        line))
    return out


NO_BLOCKS = "so its blocks cannot be cached"  # what the cache's log says where blocks cannot be cached, and why


def cache_cell(built, logs, label, blocks):
    """engaged: blocks reused (or, for a whole-call cache, calls); whole-call: a block cache on a model without
    block replacement reused whole calls and its log says why; anything else fails."""
    runs = cache_counts(logs, label)
    if not runs:
        raise AssertionError(f"{built.family.name}: no cache run logged: {logs.lines}")
    hits, calls, block_hits, block_calls, line = runs[-1]
    if block_hits:
        return Cell("engaged", f"{block_hits}/{block_calls} blocks" + (f", {hits}/{calls} calls" if hits else ""),
                    line)
    if hits and not blocks:
        return Cell("engaged", f"{hits}/{calls} calls", line)
    reason = next((entry for entry in logs.lines if NO_BLOCKS in entry), None)
    if hits and reason:
        return Cell("whole-call", f"{hits}/{calls} calls", f"{reason}\n{line}")
    raise AssertionError(f"{built.family.name}: the cache reused nothing and said nothing: {logs.lines}")


def cell_step_cache_input(built, cache):
    with captured() as logs:
        model = node("StrideStepCache").execute(model=built.model, threshold=5.0, start=0.0, end=1.0, max_hits=1,
                                                indicator="input change").result[0]
        out = ksampler(built, model)
    assert finite(out)
    return cache_cell(built, logs, "step cache", blocks=False)


def cell_step_cache_block(built, cache):
    with captured() as logs:
        try:
            model = node("StrideStepCache").execute(model=built.model, threshold=5.0, start=0.0, end=1.0, max_hits=1,
                                                    indicator="first block residual").result[0]
        except ValueError as e:
            return refused(e, built)
        out = ksampler(built, model)
    assert finite(out)
    return cache_cell(built, logs, "step cache", blocks=True)


PLAN_STEPS = 8  # a plan's call gate needs change rates, defined from a unit's third output on


def cell_cache_plan(built, cache):
    """InvarDiff: calibrate (blocks quantile 0.7, calls 0.25: permissive) and apply, through the KSampler path."""
    with captured() as logs:
        model, text = node("StrideCalibrateCachePlan").execute(
            built.model, built.positive(), built.negative(), latent_input(built), "euler", "simple", PLAN_STEPS, CFG,
            1, SEED, 0.7, 0.25, 0.0).result
        out = ksampler(built, model, steps=PLAN_STEPS)
    assert finite(out)
    return cache_cell(built, logs, "cache plan", blocks=True)


def cell_tstitch(built, cache, small=None):
    from bench import families
    small = small or families.build(built.family.name, depth=1)
    with captured() as logs:
        try:
            model = node("StrideTStitch").execute(model=built.model, small_model=small.model, fraction=0.5).result[0]
        except ValueError as e:
            return refused(e, built)
        out = ksampler(built, model)
    m = [m for m in logs.find(r"Stride T-Stitch: (\d+) of (\d+) model calls by the small model")]
    if not finite(out) or not m or int(m[-1][1]) == 0:
        raise AssertionError(f"{built.family.name}: T-Stitch made no small-model call: {logs.lines}")
    return Cell("engaged", f"{m[-1][1]}/{m[-1][2]} calls by the small model", m[-1][0])


# schedule optimizers at the smallest budgets their nodes accept for STEPS steps (4 steps: GITS 6, AYS 145, LD3 65,
# evolution 41 with a population of 4)
OPTIMIZERS = {"GITS": ("StrideScheduleGITS", {"budget": 6, "coeff": 1.15, "metric": "l2"}),
              "AYS": ("StrideScheduleAYS", {"budget": 145, "initial": "auto"}),
              "LD3": ("StrideScheduleLD3", {"budget": 65, "initial": "auto"}),
              "evolution": ("StrideScheduleEvolution", {"budget": 41, "initial": "auto", "population": 4})}


def cell_schedules(built, cache):
    """Every schedule optimizer on the model at a small budget: its schedule is not the one it started from (a
    fitted schedule), and SamplerCustomAdvanced samples it to a finite result."""
    import comfy.samplers
    done, notes = [], []
    for label, (name, extra) in OPTIMIZERS.items():
        with captured() as logs:
            try:
                sigmas, text = node(name).execute(built.model, built.positive(), built.negative(), latent_input(built),
                                                  CFG, "dpmpp_2m", STEPS, samples=1, seed=SEED, denoise=1.0,
                                                  **extra).result
            except ValueError as e:
                notes.append(short(refused(e, built).detail))
                continue
            out = advanced(built, comfy.samplers.sampler_object("dpmpp_2m"), sigmas)
        start = initial_schedule(built)
        fitted = sigmas.shape != start.shape or not torch.allclose(sigmas.float(), start.float(), rtol=1e-4)
        if not finite(out):
            raise AssertionError(f"{built.family.name}: {label} gave a non-finite result: {logs.lines}")
        if not fitted:  # kept its starting schedule: counted only where its log says so (loss no better, kept)
            if not any("kept" in line or "initial_loss" in line for line in logs.lines):
                raise AssertionError(f"{built.family.name}: {label} returned its starting schedule: {logs.lines}")
            notes.append(f"{label}: kept its starting schedule (no better fit, logged)")
            continue
        done.append(label)
    if not done:
        return Cell("refused", "; ".join(notes))
    return Cell("engaged", f"{len(done)}/{len(OPTIMIZERS)} fitted schedules" + "".join(f"; {n}" for n in notes),
                ", ".join(done))


def initial_schedule(built):
    """What the optimizers start from ('auto': karras, or simple on flow models)."""
    import comfy.model_sampling
    import comfy.samplers
    ms = built.model.get_model_object("model_sampling")
    name = "simple" if isinstance(ms, comfy.model_sampling.CONST) else "karras"
    return comfy.samplers.calculate_sigmas(ms, name, STEPS).float().cpu()


# calibrated solvers: (calibrate node, its options, sampler node, its options, stride_* KSampler name)
CALIBRATED = {"DC-Solver": ("StrideCalibrateDCSolver", {"solver": "unipc"}, "StrideSamplerDCSolver", {},
                            "stride_dc_solver"),
              "IIA": ("StrideCalibrateIIA", {"base": "dpmpp_2m", "target": "reference"}, "StrideSamplerIIA", {},
                      "stride_iia_dpmpp_2m"),
              "DPM-Solver-v3": ("StrideCalibrateDPMSolverV3", {"statistics": "per_channel"},
                                "StrideSamplerDPMSolverV3", {"order": 2, "corrector": "on"}, "stride_dpm_solver_v3")}
CALIBRATION_NOISES = 2  # the fewest the calibrated solvers accept: each fits on one and judges its fit on the other


def cell_calibrated(built, cache):
    """Each calibrated solver: calibrated on the model (CALIBRATION_NOISES noises), then sampled with its fitted
    values through SamplerCustomAdvanced (the sampler node with the calibration text) and KSampler (its stride_*
    name, which finds the stored calibration); 'using the stored calibration' logged and a finite result. A
    calibration that does no better than its base on the held-out noise is refused (counted as such)."""
    done, notes = [], []
    for label, (calibrate, options, sampler_node, sampler_options, name) in CALIBRATED.items():
        with captured() as logs:
            try:
                text = node(calibrate).execute(built.model, built.positive(), built.negative(), latent_input(built),
                                               CFG, "simple", STEPS, CALIBRATION_NOISES, SEED,
                                               **options).result[0]
            except ValueError as e:
                notes.append(short(refused(e, built).detail))
                continue
            sampler = node(sampler_node).execute(calibration=text, **sampler_options).result[0]
            a = advanced(built, sampler)
            b = ksampler(built, sampler=name)
        if not (finite(a) and finite(b)):
            raise AssertionError(f"{built.family.name}: {label} gave a non-finite result: {logs.lines}")
        if not any("using the stored calibration" in line for line in logs.lines):
            raise AssertionError(f"{built.family.name}: {label} neither used its fit nor said why: {logs.lines}")
        done.append(label)
    if not done:
        return Cell("refused", "; ".join(notes))
    return Cell("engaged", f"{len(done)}/{len(CALIBRATED)} fitted solvers" + "".join(f"; {n}" for n in notes),
                ", ".join(done))


FEATURES = {
    "stride_* KSampler names": cell_ksampler_names,
    "sampler nodes (SamplerCustomAdvanced)": cell_sampler_nodes,
    "CFG schedule": cell_cfg_schedule,
    "RAAG": cell_raag,
    "step cache (input change)": cell_step_cache_input,
    "step cache (first block)": cell_step_cache_block,
    "cache plan": cell_cache_plan,
    "T-Stitch": cell_tstitch,
    "calibrated solvers": cell_calibrated,
    "schedule optimizers": cell_schedules,  # after the solvers: LD3's failing backward pass may leave state behind
}


CALIBRATING = ("calibrated solvers", "schedule optimizers")  # the costly columns (hundreds of model calls a cell)
QUICK_CALIBRATED = ("SD1.5", "Flux dev", "WAN 2.1 T2V")  # --quick: one EPS UNet, one flow DiT, one 5-D video DiT


def run_family(name, features=None, on_cell=None, quick=False, strict=True):
    """{feature: Cell} for one family (each cell on a new model of the family's cached weights); quick: the
    calibrating columns only on QUICK_CALIBRATED; strict (the tests): a cell that fails raises, else (the bench)
    it is recorded as failed and the matrix goes on."""
    from bench import families
    reason = families.unavailable(name)
    features = features or list(FEATURES)
    if reason:
        return {f: Cell("unavailable", reason) for f in features}
    out, cache = {}, {}
    for feature in features:
        if quick and feature in CALIBRATING and name not in QUICK_CALIBRATED:
            out[feature] = Cell("skipped", "not run by --quick")
            continue
        built = families.build(name)
        start = time.perf_counter()
        try:
            out[feature] = FEATURES[feature](built, cache)
        except Exception as error:  # noqa: BLE001 (the bench reports every failure in the table)
            if strict:
                raise
            out[feature] = Cell("failed", f"{type(error).__name__}: {str(error).splitlines()[0][:100]}")
        if on_cell:
            on_cell(name, feature, out[feature], time.perf_counter() - start)
    return out


@contextlib.contextmanager
def calibration_folder():
    """Calibrations (cache plans, fitted solvers, schedules) go to a temporary folder, first in Stride's list,
    removed afterwards: every run calibrates afresh and nothing lands in ComfyUI's models folder."""
    import shutil
    import tempfile
    import folder_paths
    from bench import host
    store = host.stride("nodes.calibration_store")
    store.register()
    paths = folder_paths.folder_names_and_paths[store.FOLDER][0]
    path = tempfile.mkdtemp(prefix="stride-coverage-")
    paths.insert(0, path)
    try:
        yield path
    finally:
        paths.remove(path)
        shutil.rmtree(path, ignore_errors=True)


def run(names=None, features=None, on_cell=None, quick=False, strict=True):
    from bench import families, host
    host.boot()
    torch.set_num_threads(1)
    names = names or [f.name for f in families.FAMILIES]
    with calibration_folder():
        return {name: run_family(name, features, on_cell, quick, strict) for name in names}


def merged_text(cells):
    """One table cell from {tree: Cell} (trees newest first): the newest tree's text, and in brackets each other
    tree's where it differs ('not in this ComfyUI' included)."""
    texts = [(tree, cell.text()) for tree, cell in cells.items()]
    first = texts[0][1]
    return first + "".join(f" [{tree}: {text}]" for tree, text in texts[1:] if text != first)


def markdown(results, features=None):
    """The table; results: {family: {feature: Cell}} of one tree, or {tree: that} of several (newest first)."""
    from bench import families
    features = features or list(FEATURES)
    first = next(iter(results.values()))
    trees = results if isinstance(next(iter(first.values())), dict) else {"": results}
    names = [f.name for f in families.FAMILIES if any(f.name in r for r in trees.values())]
    rows = ["| family | model | " + " | ".join(features) + " |", "|---" * (len(features) + 2) + "|"]
    for name in names:
        family = families.BY_NAME[name]
        cells = [merged_text({t: r[name][f] for t, r in trees.items() if name in r and f in r[name]})
                 for f in features]
        rows.append(f"| {name} | {family.config}: {family.note} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def cell_texts(table_cell):
    """{tree: status text} of a table cell ('' = the newest tree's, the text outside brackets)."""
    head, *others = table_cell.split(" [")
    out = {"": head.strip()}
    for other in others:
        tree, _, text = other.rstrip("]").partition(": ")
        out[tree] = text.strip()
    return out


def save(path, results):
    with open(path, "w") as f:
        json.dump({n: {k: c._asdict() for k, c in cells.items()} for n, cells in results.items()}, f, indent=1)


def load(path):
    with open(path) as f:
        data = json.load(f)
    return {name: {feature: Cell(**cell) for feature, cell in cells.items()} for name, cells in data.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="the CI's cells: schedule optimizers and calibrated solvers on one family per "
                             "parameterization and latent form only (the other columns on every family)")
    parser.add_argument("--json", help="write the cells as JSON here")
    parser.add_argument("--markdown", help="write the table here (docs/coverage.md)")
    parser.add_argument("--families", help="comma-separated family names (default: all)")
    parser.add_argument("--merge", nargs="+", metavar="TREE=JSON",
                        help="no run: print the table of these --json outputs, one per ComfyUI tree, newest first "
                             "(e.g. 0.33.0=new.json 0.3.75=old.json)")
    args = parser.parse_args(argv)
    if args.merge:
        trees = {pair.split("=", 1)[0]: load(pair.split("=", 1)[1]) for pair in args.merge}
        table = markdown(trees)
        print(table)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(HEADER + table + "\n")
        return
    names = [n.strip() for n in args.families.split(",")] if args.families else None
    def on_cell(name, feature, cell, seconds):
        print(f"{name:18s} {feature:40s} {seconds:5.1f}s {cell.text()}", file=sys.stderr)
        if args.json:  # kept current, so a long run that stops keeps what it measured
            done.setdefault(name, {})[feature] = cell
            save(args.json, done)
    done = {}
    results = run(names, on_cell=on_cell, quick=args.quick, strict=False)
    table = markdown(results)
    print(table)
    if args.json:
        save(args.json, results)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(HEADER + table + "\n")


HEADER = """# Stride on every model family ComfyUI ships

Printed by `python -m bench.coverage` (tiny random-weight models built through `comfy.supported_models`, 4 steps,
8 for the cache plan and the Bottleneck sampler, cfg 3, batch 1, on CPU; the settings of each column are in
bench/coverage.py, the models in bench/families.py). A cell says what the feature did on that family:
*engaged* with what was measured (block evaluations or model calls answered from a cache, unconditional passes
skipped, calls made by the small model, fitted schedules and solvers used), *whole calls* where a block cache found no
block to replace (the log says why) and cached whole model calls, *refused* with Stride's error saying why. Where
the older ComfyUI tree differs, its result follows in brackets. This table is the full run; CI runs the `--quick`
subset (the calibrated solvers and schedule optimizers on one EPS UNet, one flow DiT and one video DiT only), and
tests/test_coverage.py checks each cell of that subset against this table on each tree. A calibrated solver is
fitted on one noise and judged on another, and refused when it does no better there than its uncalibrated base:
on these random-weight models a refusal is the expected, honest outcome.

"""


if __name__ == "__main__":
    main()
