"""Stride's schedule optimizers beside ComfyUI's schedulers and the AYS/GITS tables: error per solver and NFE,
and what each optimizer's calibration cost.

    .venv/bin/python -m bench.schedules [--quick] [--models a,b] [--budget N] [--samples N] [--json PATH]
                                        [--tables-from A.json,B.json]

Protocol. Per model and guidance scale, every solver (ComfyUI's euler, dpmpp_2m and uni_pc, and stride_ghvb:
the Stride sampler most often best at NFE 4-10 in bench.solvers' last run, docs/bench_solvers.md) runs at each
NFE (steps = NFE: one model call per step) with each schedule, through ComfyUI's own sampling path
(comfy.sample.sample_custom, as SamplerCustom does), from the same noise and conditioning as x_ref:
- ComfyUI's schedulers karras, simple, beta, kl_optimal (with KSampler's penultimate-sigma handling, as
  bench.solvers);
- the published tables: AlignYourStepsScheduler (model_type SD1) and GITSScheduler (coeff 1.20), which are SD1.5
  noise levels, so they run only on models whose model_sampling has SD1.5's range (n/a elsewhere);
- Stride's optimizers, each through its node's execute on the same model and conditioning, at the same
  calibration budget in model evaluations (--budget), `samples` calibration noises drawn from a seed that no
  evaluation uses, starting from karras (EPS) or simple (flow): StrideScheduleGITS (coeff 1.15; its cost matrix is
  stored per model, cfg and solver, so one calibration serves every NFE), StrideScheduleAYS (its objective does
  not depend on the solver: one calibration per NFE, shared by the solvers), StrideScheduleLD3 and
  StrideScheduleEvolution (population 16; one calibration per solver and NFE).
The calibration store points at a fresh temporary folder for each run: nothing is reused from earlier runs.
Error = per-image RMSE over the latent against x_ref (the guided PF-ODE solved to the model's sigma_min from the
same noise, then denoised: analytic for the oracle, the network's own ODE at tolerance 1e-5), in data standard
deviations, over digits 0-9 x the evaluation seeds; NFE is counted inside the model (a CFG pair counts once).
"""
import json
import math
import os
import time

import torch

from . import host
from .common import (ModelSetup, error_ratio, fresh_calibration_store, parser, read_merged, run_against_reference,
                     write_json)
from .solvers import SAMPLERS, STRIDE, TIE, available, sampler_object

SOLVERS = ["euler", "dpmpp_2m", "uni_pc*", "stride_ghvb"]  # labels of bench.solvers
SCHEDULERS = ["karras", "simple", "beta", "kl_optimal"]
TABLES = {"ays-table": ("AlignYourStepsScheduler", {"model_type": "SD1"}),
          "gits-table": ("GITSScheduler", {"coeff": 1.20})}
SD1_RANGE = (0.0291671582, 14.6146412293)  # the noise levels the tables were made for
# label -> (node class name, extra inputs, what one calibration serves)
OPTIMIZERS = {"Stride GITS": ("StrideScheduleGITS", {"coeff": 1.15}, "solver"),
              "Stride AYS": ("StrideScheduleAYS", {"initial": "auto"}, "nfe"),
              "Stride LD3": ("StrideScheduleLD3", {"initial": "auto"}, "cell"),
              "Stride evolution": ("StrideScheduleEvolution", {"initial": "auto", "population": 16}, "cell")}
BUILTIN = SCHEDULERS + list(TABLES)
SCHEDULES = BUILTIN + list(OPTIMIZERS)
SERVES = {"solver": "every NFE of one solver", "nfe": "every solver at one NFE", "cell": "one solver at one NFE"}
CALIBRATION_SEED = 1000  # the evaluation noises come from seeds 0, 1, ...

_ORACLE = {"cfgs": [1.0, 5.5], "seeds": [0, 1], "nfes": [4, 6, 8, 10], "solvers": SOLVERS, "rtol": 1e-8}
_NETWORK = {"cfgs": [3.0], "seeds": [0], "nfes": [4, 6, 8, 10], "solvers": SOLVERS, "rtol": 1e-5}
MODELS = {"oracle_eps": _ORACLE, "oracle_flow": _ORACLE, "unet_small": _NETWORK, "dit_small": _NETWORK,
          "unet_large": _NETWORK, "dit_large": _NETWORK}
DEFAULT = ["oracle_eps", "oracle_flow", "dit_small", "unet_small"]
QUICK_GRID = {"cfgs": [5.5], "seeds": [0], "nfes": [4], "solvers": ["euler", "dpmpp_2m"]}
QUICK_MODELS = ["oracle_eps"]
BUDGET, QUICK_BUDGET = 400, 160  # AYS needs 25 + 40 per interior step for one sweep: 385 at NFE 10
SAMPLES, QUICK_SAMPLES = 4, 2


def comfy_name(label):
    return (STRIDE.get(label) or SAMPLERS[label])[0]


def tables_apply(model_sampling):
    """The AYS/GITS tables are SD1.5 noise levels: usable on a model with SD1.5's sigma range only."""
    lo, hi = SD1_RANGE
    return (math.isclose(float(model_sampling.sigma_max), hi, rel_tol=1e-3)
            and math.isclose(float(model_sampling.sigma_min), lo, rel_tol=1e-3))


def calibration_conditioning(conditioning, samples, digits=10):
    """The conditioning of `samples` calibration images, spread over the digits (rows of the first seed)."""
    rows = torch.linspace(0, digits - 1, samples).round().long()
    return [[t[rows], {k: v[rows] if torch.is_tensor(v) and v.shape[:1] == t.shape[:1] else v
                       for k, v in options.items()}] for t, options in conditioning]


def builtin_sigmas(setup, label, schedule, steps, tables):
    """Sigmas as a user gets them: KSampler's handling for the named schedulers, the node's output for the tables;
    None where a table does not apply."""
    import nodes
    if schedule in TABLES:
        if not tables:
            return None
        node_id, options = TABLES[schedule]
        return nodes.NODE_CLASS_MAPPINGS[node_id].execute(steps=steps, denoise=1.0, **options).result[0]
    return host.stride("nodes.compare").schedule(setup.model_sampling, comfy_name(label), schedule, steps)


class Optimizers:
    """Runs the optimizer nodes for one model and cfg; remembers which calls calibrated and which reused."""

    def __init__(self, setup, cfg, budget, samples, folder):
        self.setup, self.cfg, self.budget, self.samples, self.folder = setup, cfg, budget, samples, folder
        self.positive = calibration_conditioning(setup.positive, samples)
        self.latent = {"samples": torch.zeros(1, *setup.noise.shape[1:])}
        self.calibrations = []
        self.cache = {}

    def sigmas(self, optimizer, label, nfe, first_label):
        """(sigmas or None, error text or None) of the optimizer for this solver and NFE."""
        node_id, extra, serves = OPTIMIZERS[optimizer]
        solver = first_label if serves == "nfe" else label
        key = (optimizer, solver, nfe)
        if key not in self.cache:
            self.cache[key] = self._run(optimizer, node_id, extra, serves, solver, nfe)
        return self.cache[key]

    def _run(self, optimizer, node_id, extra, serves, solver, nfe):
        import nodes
        before = len(os.listdir(self.folder))
        start = time.perf_counter()
        try:
            with torch.inference_mode():  # as ComfyUI's executor runs every node
                out = nodes.NODE_CLASS_MAPPINGS[node_id].execute(
                    self.setup.model, self.positive, self.setup.negative, self.latent, self.cfg, comfy_name(solver),
                    nfe, self.budget, self.samples, CALIBRATION_SEED, 1.0, **extra)
        except Exception as e:  # noqa: BLE001  a node that fails here fails for the user too: report it
            return None, f"{type(e).__name__}: {e}"
        wall = time.perf_counter() - start
        sigmas, text = out.result
        info = json.loads(text)["calibration"]
        if len(os.listdir(self.folder)) > before:  # a new calibration (not the stored one reused)
            self.calibrations.append({"model": self.setup.name, "cfg": self.cfg, "optimizer": optimizer,
                                      "solver": solver, "nfe": nfe, "serves": serves, "wall_seconds": wall,
                                      "budget": self.budget, "samples": self.samples, **info})
        return sigmas.float().clone(), None


def measure(plan, budget=BUDGET, samples=SAMPLES, log=print):
    """(rows, calibrations): one row per model, cfg, schedule, solver and NFE; one calibration record per
    optimizer run that calibrated (a reused stored result is not a calibration)."""
    rows, calibrations = [], []
    with fresh_calibration_store() as folder:
        for name in available(plan):
            grid = plan[name]
            setup = ModelSetup(name, grid["seeds"])
            data_std = setup.mixture.data_std()
            tables = tables_apply(setup.model_sampling)
            references = {}
            for cfg in grid["cfgs"]:
                start = time.perf_counter()
                optimizers = Optimizers(setup, cfg, budget, samples, folder)
                for label in grid["solvers"]:
                    for nfe in grid["nfes"]:
                        for schedule in SCHEDULES:
                            note = None
                            if schedule in OPTIMIZERS:
                                sigmas, note = optimizers.sigmas(schedule, label, nfe, grid["solvers"][0])
                            else:
                                sigmas = builtin_sigmas(setup, label, schedule, nfe, tables)
                            row = {"model": name, "cfg": cfg, "schedule": schedule, "solver": label,
                                   "target_nfe": nfe, "sigmas": None if sigmas is None else sigmas.tolist()}
                            if sigmas is None:
                                rows.append({**row, "error": None, "median_error": None, "nfe": None,
                                             "note": note or "n/a"})
                                continue
                            err, counter, seconds = run_against_reference(setup, references, sampler_object(label),
                                                                          sigmas, cfg, grid["rtol"], data_std)
                            rows.append({**row, "error": err.mean().item(), "median_error": err.median().item(),
                                         "nfe": counter.nfe, "seconds": seconds})
                calibrations += optimizers.calibrations
                log(f"{name} cfg {cfg}: {time.perf_counter() - start:.0f} s")
    return rows, calibrations


def settings(rows):
    return list(dict.fromkeys((r["model"], r["cfg"]) for r in rows))


def _columns(rows, model, cfg):
    pick = [r for r in rows if r["model"] == model and r["cfg"] == cfg]
    return list(dict.fromkeys((r["solver"], r["target_nfe"]) for r in pick)), pick


def error_table(rows, model, cfg):
    """Markdown: schedule rows, solver x NFE columns of 'mean / median' error; **bold**: the lowest mean of the
    column; '(n)' marks a counted NFE that differs from the column's."""
    columns, pick = _columns(rows, model, cfg)
    cells = {(r["schedule"], r["solver"], r["target_nfe"]): r for r in pick}
    best = {}
    for col in columns:
        errors = [cells[(s, *col)]["error"] for s in SCHEDULES if (s, *col) in cells]
        errors = [e for e in errors if e is not None and math.isfinite(e)]
        best[col] = min(errors, default=None)
    lines = ["| schedule | " + " | ".join(f"{s} {n}" for s, n in columns) + " |", "|---|" + "---|" * len(columns)]
    for schedule in SCHEDULES:
        out = []
        for col in columns:
            r = cells.get((schedule, *col))
            if r is None:
                out.append("")
            elif r["error"] is None:
                out.append("failed" if r["note"] != "n/a" else "n/a")
            else:
                mean = f"{r['error']:.3g}"
                mean = f"**{mean}**" if r["error"] == best[col] else mean
                mark = "" if r["nfe"] == r["target_nfe"] else f" ({r['nfe']})"
                out.append(f"{mean} / {r['median_error']:.3g}{mark}")
        lines.append(f"| {schedule} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def cost_table(calibrations, model, cfg):
    """Markdown: per optimizer, the calibrations run for this setting and their cost."""
    lines = ["| optimizer | one calibration serves | calibrations run | budget | model evaluations / calibration "
             "(mean, max) | seconds / calibration (mean, max) | seconds in all |", "|---|---|---|---|---|---|---|"]
    for optimizer in OPTIMIZERS:
        cs = [c for c in calibrations if c["model"] == model and c["cfg"] == cfg and c["optimizer"] == optimizer]
        if not cs:
            continue
        ev, sec = [c["evaluations"] for c in cs], [c["seconds"] for c in cs]
        lines.append(f"| {optimizer} | {SERVES[cs[0]['serves']]} | {len(cs)} | {cs[0]['budget']} | "
                     f"{sum(ev) / len(ev):.0f}, {max(ev):.0f} | {sum(sec) / len(sec):.2f}, {max(sec):.2f} | "
                     f"{sum(sec):.1f} |")
    return "\n".join(lines)


def comparisons(rows, model, cfg):
    """{optimizer: {"builtin": [ratios to the best built-in schedule of the cell], "default": [ratios to karras
    (EPS) or simple (flow)], "evolution": [ratios to Stride evolution]}} over the solver x NFE cells."""
    columns, pick = _columns(rows, model, cfg)
    cells = {(r["schedule"], r["solver"], r["target_nfe"]): r["error"] for r in pick}
    flow = not any(cells.get(("ays-table", *col)) is not None for col in columns)
    default = "simple" if flow else "karras"
    out = {}
    for optimizer in OPTIMIZERS:
        ratios = {"builtin": [], "default": [], "evolution": []}
        for col in columns:
            ours = cells.get((optimizer, *col))
            builtin = [cells.get((s, *col)) for s in BUILTIN]
            builtin = [e for e in builtin if e is not None and math.isfinite(e)]
            if (optimizer, *col) not in cells:
                continue  # not measured in this column
            for key, other in (("builtin", min(builtin, default=None)), ("default", (default, *col)),
                               ("evolution", ("Stride evolution", *col))):
                if isinstance(other, tuple):
                    if other not in cells:
                        continue  # no such baseline measured here
                    other = cells[other]
                ratios[key].append(error_ratio(ours, other))  # a failed run (None, inf) of either side: a loss
        out[optimizer] = ratios
    return out


def _wtl(ratios):
    wins, losses = sum(r < 1 - TIE for r in ratios), sum(r > 1 + TIE for r in ratios)
    median = sorted(ratios)[len(ratios) // 2] if ratios else None
    return f"{wins} / {len(ratios) - wins - losses} / {losses}", "" if median is None else f"{median:.3g}"


def summary_table(rows):
    """Markdown: per setting and optimizer, wins / ties / losses and the median error ratio over the cells, against
    the best built-in schedule of each cell, against the optimizers' starting scheduler, and against evolution."""
    lines = ["| model | cfg | optimizer | vs best built-in: wins / ties / losses | median ratio | vs karras (EPS) / "
             "simple (flow): w / t / l | median ratio | vs Stride evolution: w / t / l | median ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    every = {o: {"builtin": [], "default": [], "evolution": []} for o in OPTIMIZERS}
    blocks = []
    for model, cfg in settings(rows):
        for optimizer, ratios in comparisons(rows, model, cfg).items():
            blocks.append((model, f"{cfg:g}", optimizer, ratios))
            for key, values in ratios.items():
                every[optimizer][key] += values
    blocks += [("all settings", "", optimizer, ratios) for optimizer, ratios in every.items()]
    for model, cfg, optimizer, ratios in blocks:
        cells = []
        for key in ("builtin", "default", "evolution"):
            cells += ["", ""] if key == "evolution" and optimizer == "Stride evolution" else list(_wtl(ratios[key]))
        lines.append(f"| {model} | {cfg} | {optimizer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best_table(rows):
    """Markdown: per setting, how often each schedule is the best of its column (ties within 1% shared)."""
    lines = ["| model | cfg | cells | " + " | ".join(SCHEDULES) + " |", "|---|---|---|" + "---|" * len(SCHEDULES)]
    for model, cfg in settings(rows):
        columns, pick = _columns(rows, model, cfg)
        cells = {(r["schedule"], r["solver"], r["target_nfe"]): r["error"] for r in pick}
        count = dict.fromkeys(SCHEDULES, 0)
        for col in columns:
            errors = {s: cells.get((s, *col)) for s in SCHEDULES}
            errors = {s: e for s, e in errors.items() if e is not None and math.isfinite(e)}
            if errors:
                low = min(errors.values())
                for s, e in errors.items():
                    count[s] += e <= low * (1 + TIE)
        lines.append(f"| {model} | {cfg:g} | {len(columns)} | " + " | ".join(str(count[s]) for s in SCHEDULES) + " |")
    return "\n".join(lines)


def overall_cost_table(calibrations):
    """Markdown: per model and optimizer, the mean cost of one calibration over every setting."""
    lines = ["| model | optimizer | calibrations | model evaluations / calibration | seconds / calibration | "
             "ms / evaluation |", "|---|---|---|---|---|---|"]
    for model in dict.fromkeys(c["model"] for c in calibrations):
        for optimizer in OPTIMIZERS:
            cs = [c for c in calibrations if c["model"] == model and c["optimizer"] == optimizer]
            if cs:
                ev, sec = sum(c["evaluations"] for c in cs), sum(c["seconds"] for c in cs)
                lines.append(f"| {model} | {optimizer} | {len(cs)} | {ev / len(cs):.0f} | {sec / len(cs):.2f} | "
                             f"{1e3 * sec / ev:.1f} |")
    return "\n".join(lines)


def failures(rows):
    """['schedule, solver: message (model cfg / NFEs, ...)'] for the optimizer runs that raised."""
    groups = {}
    for r in rows:
        if r["error"] is None and r.get("note") not in (None, "n/a"):
            where = groups.setdefault((r["schedule"], r["solver"], r["note"]), {})
            where.setdefault(f"{r['model']} cfg {r['cfg']:g}", []).append(str(r["target_nfe"]))
    out = []
    for (schedule, solver, note), where in groups.items():
        places = "; ".join(f"{setting} NFE {','.join(nfes)}" for setting, nfes in where.items())
        out.append(f"{schedule}, {solver}: {note} ({places})")
    return out


def report(data, title):
    rows, calibrations, run = data["rows"], data["calibrations"], data["run"]
    seeds = ", ".join(f"{m} {p['seeds']}" for m, p in data["plan"].items())
    print(f"\n## {title}\n")
    print(f"Calibration: {run['budget']} model evaluations per optimizer run (the same budget for all four), "
          f"{run['samples']} noises from seed {run['calibration_seed']}; evaluation: digits 0-9 x seeds "
          f"{seeds}. Errors are mean / median per-image "
          f"RMSE vs x_ref in data standard deviations; **bold**: the lowest mean of the column. Ratios are the "
          f"optimized schedule's error over the other's (< 0.99: a win; within 1% of 1: a tie).\n")
    print("### Optimized schedules against the baselines, over the solver x NFE cells of each setting\n")
    print(summary_table(rows))
    print("\n### How often each schedule is the best of its column (within 1%)\n")
    print(best_table(rows))
    print("\n### Calibration cost per model (one optimizer run; CPU, one thread, a shared 2-core machine)\n")
    print(overall_cost_table(calibrations))
    for model, cfg in settings(rows):
        images = 10 * len(data["plan"][model]["seeds"])
        print(f"\n### {model}, cfg {cfg:g}: mean / median per-image error ({images} images)\n")
        print(error_table(rows, model, cfg))
        print(f"\nCalibration cost, {model}, cfg {cfg:g}:\n")
        print(cost_table(calibrations, model, cfg))
    problems = failures(rows)
    if problems:
        print("\nFailed optimizer runs:\n\n" + "\n".join(f"- {p}" for p in problems))
    print("\n`*` ComfyUI's uni_pc integrates to sigma = 0.001 instead of taking a final denoise, which puts a floor "
          "under its error; with a named scheduler it drops the penultimate sigma, as KSampler does. n/a: the AYS "
          "and GITS tables are SD1.5 noise levels, used only on models with SD1.5's sigma range. Stride GITS models "
          "a stride_ghvb step as an Euler jump (it has no GHVB jump); Stride AYS's objective does not depend on "
          "the solver, so its schedule for each NFE is calibrated once and shared by the solvers. Seconds are the "
          "optimizers' own measurement of their calibration.")


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--models", help=f"comma-separated subset of {', '.join(MODELS)} (default "
                                    f"{','.join(DEFAULT)})")
    p.add_argument("--budget", type=int, help=f"calibration budget in model evaluations, the same for every "
                                              f"optimizer (default {BUDGET}, quick {QUICK_BUDGET})")
    p.add_argument("--samples", type=int, help=f"calibration noises (default {SAMPLES}, quick {QUICK_SAMPLES})")
    p.add_argument("--tables-from", metavar="JSON[,JSON]",
                   help="print the tables from earlier --json outputs (merged) instead of measuring")
    args = p.parse_args()
    if args.tables_from:
        data = read_merged(args.tables_from)
        seconds = f", measured in {data['run']['seconds']:.0f} s" if "seconds" in data["run"] else ""
        report(data, f"Optimized schedules beside ComfyUI's on the demo models ({args.tables_from}{seconds})")
        return
    models = args.models.split(",") if args.models else (QUICK_MODELS if args.quick else DEFAULT)
    if set(models) - set(MODELS):
        p.error(f"unknown models {sorted(set(models) - set(MODELS))}; choose from {list(MODELS)}")
    plan = {name: {**MODELS[name], **(QUICK_GRID if args.quick else {})} for name in models}
    budget = args.budget or (QUICK_BUDGET if args.quick else BUDGET)
    samples = args.samples or (QUICK_SAMPLES if args.quick else SAMPLES)
    host.boot()
    start = time.perf_counter()
    rows, calibrations = measure(plan, budget, samples)
    run = {"budget": budget, "samples": samples, "calibration_seed": CALIBRATION_SEED, "quick": args.quick,
           "seconds": time.perf_counter() - start}
    data = {"plan": plan, "run": run, "rows": rows, "calibrations": calibrations}
    report(data, f"Optimized schedules beside ComfyUI's on the demo models ({'quick' if args.quick else 'full'} "
                 f"run, {run['seconds']:.0f} s)")
    write_json(args.json, data)


if __name__ == "__main__":
    main()
