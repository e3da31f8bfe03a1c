"""`bench.structural`: the structural accelerators (ParaDiGMS, Bottleneck Sampling, analytical teleportation, ReDi)
through their nodes, each beside the same sampling without the method, against x_ref (docs/bench_structural.md).

    .venv/bin/python -m bench.structural [--quick] [--models a,b] [--json PATH] [--tables-from A.json,B.json]

ParaDiGMS and Bottleneck are SAMPLER nodes (no calibration); teleportation and ReDi are calibrated in a fresh
calibration store (one digit class per calibration: their statistics / knowledge base hold for one conditioning).
Model evaluations are counted inside the model; ParaDiGMS's rounds and evaluations, and Bottleneck's compute
fraction, are read from the nodes' own log lines.
"""
import contextlib
import logging
import math
import os
import time

import torch

from . import host
from .common import (ModelSetup, fresh_calibration_store, parser, read_merged, run_against_reference,
                     write_json)

SCHEDULER = {"eps": "karras", "flow": "simple"}
EPS_MODELS = {"oracle_eps", "unet_small", "unet_large"}
CFG = 3.0
CAL_SEED = 1000
METHODS = ["ParaDiGMS", "Bottleneck", "teleportation", "ReDi"]
BOTTLENECK_SETTINGS = {"default": ("0.2, 0.55, 0.25", "1.0, 0.8, 0.6", "1.0, 1.0, 1.0"),
                       "shifts 3,2,3": ("0.2, 0.55, 0.25", "1.0, 0.8, 0.6", "3, 2, 3")}
ANCHORS = {"ParaDiGMS": "ParaDiGMS paper (Shih et al. 2023): 2-4x faster wall time (GPU, idle batch capacity)",
           "Bottleneck": "Bottleneck Sampling paper (Tian et al. 2025): up to 3x faster on FLUX.1-dev images",
           "teleportation": "teleportation paper: skips 15-30% of the steps at similar quality"}

_ORACLE = {"seeds": [0, 1], "rtol": 1e-8, "digits": list(range(10)), "classes": [3, 7], "class_seeds": [0, 1, 2, 3],
           "steps": [10, 20], "windows": [4, 8], "tolerance": 0.1, "bottleneck": list(BOTTLENECK_SETTINGS),
           "skips": [0.1, 0.2, 0.3], "redi_steps": 10, "redi_kv": [(2, 4), (2, 5)], "teleport_samples": 32,
           "redi_samples": 64, "repeats": 2, "methods": METHODS, "paradigms_steps": [10, 20, 50]}
_NETWORK = {**_ORACLE, "paradigms_steps": [10, 20], "seeds": [0], "rtol": 1e-5, "class_seeds": [0, 1]}
MODELS = {"oracle_eps": _ORACLE, "oracle_flow": _ORACLE, "unet_small": _NETWORK, "dit_small": _NETWORK,
          "unet_large": _NETWORK, "dit_large": _NETWORK}
DEFAULT = ["oracle_eps", "oracle_flow", "unet_small", "dit_small"]
QUICK = {"oracle_eps": {**_ORACLE, "seeds": [0], "rtol": 1e-7, "classes": [3], "class_seeds": [0, 1], "steps": [10],
                        "paradigms_steps": [10], "windows": [4], "bottleneck": ["default"], "skips": [0.2],
                        "redi_kv": [(2, 4)],
                        "teleport_samples": 8, "redi_samples": 8, "repeats": 1,
                        "methods": ["ParaDiGMS", "Bottleneck", "teleportation", "ReDi"]},
         "dit_small": {**_NETWORK, "rtol": 1e-4, "steps": [10], "bottleneck": ["default"], "repeats": 1,
                       "methods": ["Bottleneck"]}}


def scheduler_of(name):
    return SCHEDULER["eps" if name in EPS_MODELS else "flow"]


@contextlib.contextmanager
def captured_logs(prefix):
    """The log records (their args) whose message starts with `prefix`, while the block runs."""
    found = []

    class Handler(logging.Handler):
        def emit(self, record):
            if isinstance(record.msg, str) and record.msg.startswith(prefix):
                found.append(record.args)
    root, handler = logging.getLogger(), Handler(logging.INFO)
    level = root.level
    root.addHandler(handler)
    root.setLevel(min(level, logging.INFO) if level else logging.INFO)
    try:
        yield found
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def first_row(conditioning):
    """One row of a conditioning (one digit class): ComfyUI repeats it to any batch."""
    return [[t[:1], {k: v[:1] if torch.is_tensor(v) and v.shape[:1] == t.shape[:1] else v
                     for k, v in options.items()}] for t, options in conditioning]


class Runner:
    """One model setup with its references; run(sampler, steps) -> measurement dict."""

    def __init__(self, name, seeds, digits, rtol, repeats):
        self.setup = ModelSetup(name, seeds, digits=digits)
        self.name, self.rtol, self.repeats = name, rtol, repeats
        self.data_std = self.setup.mixture.data_std()
        self.references = {}
        self.scheduler = scheduler_of(name)

    def sigmas(self, steps):
        import comfy.samplers
        return comfy.samplers.calculate_sigmas(self.setup.model_sampling, self.scheduler, steps)

    def run(self, sampler, steps, timing_repeats=1):
        err, counter, seconds = run_against_reference(self.setup, self.references, sampler, self.sigmas(steps), CFG,
                                                      self.rtol, self.data_std)
        nfe, uncond = counter.nfe, counter.uncond
        for _ in range(timing_repeats - 1):  # wall time: the fastest of the repeats (a shared machine)
            seconds = min(seconds, self.setup.sample(sampler, self.sigmas(steps), CFG)[2])
        return {"nfe": nfe, "uncond": uncond, "seconds": seconds, "error": err.mean().item(),
                "median_error": err.median().item(), "images": len(err)}


def builtin(name):
    import comfy.samplers
    return comfy.samplers.sampler_object(name)


def measure_paradigms(runner, grid, rows):
    import nodes
    node = nodes.NODE_CLASS_MAPPINGS["StrideSamplerParaDiGMS"]
    for steps in grid.get("paradigms_steps", grid["steps"]):
        seq = runner.run(builtin("ddim"), steps, grid["repeats"])
        for window in grid["windows"]:
            row = {"method": "ParaDiGMS", "model": runner.name, "steps": steps, "window": window,
                   "tolerance": grid["tolerance"], "baseline": seq}
            try:
                with torch.inference_mode():
                    sampler = node.execute(window, grid["tolerance"], 1).result[0]  # DDIM steps
                with captured_logs("Stride ParaDiGMS") as logs:
                    out = runner.run(sampler, steps, grid["repeats"])
                log_steps, rounds, _, evaluations = logs[0][:4]
                rows.append({**row, **out, "rounds": rounds, "evaluations": evaluations, "log_steps": log_steps,
                             "wall_ratio": seq["seconds"] / out["seconds"]})
            except Exception as e:  # noqa: BLE001  a node that fails here fails for the user too: report it
                rows.append({**row, "error": None, "note": f"{type(e).__name__}: {e}"})


def measure_bottleneck(runner, grid, rows):
    import nodes
    node = nodes.NODE_CLASS_MAPPINGS["StrideSamplerBottleneck"]
    for steps in grid["steps"]:
        euler = runner.run(builtin("euler"), steps, grid["repeats"])
        for setting in grid["bottleneck"]:
            fractions, strengths, shifts = BOTTLENECK_SETTINGS[setting]
            row = {"method": "Bottleneck", "model": runner.name, "steps": steps, "setting": setting,
                   "low_scale": 0.5, "fractions": fractions, "strengths": strengths, "shifts": shifts,
                   "baseline": euler}
            try:
                with torch.inference_mode():
                    sampler = node.execute(0.5, fractions, strengths, shifts).result[0]
                with captured_logs("Stride Bottleneck") as logs:
                    out = runner.run(sampler, steps, grid["repeats"])
                stage_steps, sizes, compute = logs[0][:3]
                if not math.isfinite(out["error"]):
                    raise RuntimeError("diverged (non-finite result)")
                rows.append({**row, **out, "stage_steps": list(stage_steps), "sizes": [list(s) for s in sizes],
                             "compute": compute, "wall_ratio": euler["seconds"] / out["seconds"]})
            except Exception as e:  # noqa: BLE001
                rows.append({**row, "error": None, "note": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"})


class Calibrator:
    """Runs a calibrate node on one digit class (cost counted inside the model, wall time around execute)."""

    def __init__(self, runner, digit, records, folder):
        self.runner, self.digit, self.records, self.folder = runner, digit, records, folder
        self.positive = first_row(runner.setup.positive)
        self.latent = {"samples": torch.zeros(1, *runner.setup.noise.shape[1:])}

    def __call__(self, node_id, steps, samples, **options):
        """steps None: a schedule-free calibration (teleportation's statistics take no scheduler or steps)."""
        import nodes
        model, counter = host.stride("nodes.counting").count_model_calls(self.runner.setup.model)
        before = set(os.listdir(self.folder))
        start = time.perf_counter()
        with torch.inference_mode():
            text = nodes.NODE_CLASS_MAPPINGS[node_id].execute(model, self.positive, self.runner.setup.negative,
                                                              self.latent, CFG,
                                                              *(() if steps is None else (self.runner.scheduler, steps)),
                                                              samples, CAL_SEED, **options).result[0]
        record = {"node": node_id, "model": self.runner.name, "digit": self.digit, "steps": steps,
                  "samples": samples, "options": dict(options),
                  "evaluations": counter.nfe, "uncond_passes": counter.uncond,
                  "wall_seconds": time.perf_counter() - start}
        new = sorted(set(os.listdir(self.folder)) - before)
        info = host.stride("nodes.calibration_store").read(os.path.join(self.folder, new[0]))[1]["info"] \
            if len(new) == 1 else {}
        record.update({k: info.get(k) for k in ("entries", "error", "base_error")},
                      node_evaluations=info.get("evaluations"), node_seconds=info.get("seconds"))
        self.records.append(record)
        return text


def measure_teleport(runner, grid, digit, rows, records, folder):
    import nodes
    node = nodes.NODE_CLASS_MAPPINGS["StrideSamplerTeleport"]
    calibrate = Calibrator(runner, digit, records, folder)
    samples = grid["teleport_samples"]
    rank = min(16, samples - 1)
    text = None
    for steps in grid["steps"]:
        full = runner.run(builtin("dpmpp_2m"), steps)
        for skip in grid["skips"]:
            nfe = steps - round(skip * steps)
            base = {"method": "teleportation", "model": runner.name, "digit": digit, "steps": steps, "skip": skip,
                    "target_nfe": nfe, "full": full, "baseline": runner.run(builtin("dpmpp_2m"), nfe)}
            try:  # the statistics are schedule-free: one calibration per model and class serves every row
                text = text or calibrate("StrideCalibrateTeleport", None, samples, rank=rank)
                with torch.inference_mode():
                    sampler = node.execute(text, skip=skip).result[0]
                rows.append({**base, **runner.run(sampler, steps), "rank": rank, "samples": samples})
            except Exception as e:  # noqa: BLE001
                rows.append({**base, "error": None, "note": f"{type(e).__name__}: {e}"})


def measure_redi(runner, grid, digit, rows, records, folder):
    import nodes
    node = nodes.NODE_CLASS_MAPPINGS["StrideSamplerReDi"]
    calibrate = Calibrator(runner, digit, records, folder)
    steps, samples = grid["redi_steps"], grid["redi_samples"]
    full = runner.run(builtin("ddim"), steps)
    for key_step, value_step in grid["redi_kv"]:
        nfe = steps - (value_step - key_step)
        base = {"method": "ReDi", "model": runner.name, "digit": digit, "steps": steps, "key_step": key_step,
                "value_step": value_step, "target_nfe": nfe, "samples": samples, "full": full,
                "baseline": runner.run(builtin("ddim"), nfe)}
        try:
            text = calibrate("StrideBuildReDi", steps, samples, key_step=key_step, value_step=value_step)
            base["build"] = records[-1]
            with torch.inference_mode():
                sampler = node.execute(text, neighbours=8).result[0]
            rows.append({**base, **runner.run(sampler, steps)})
        except Exception as e:  # noqa: BLE001
            rows.append({**base, "error": None, "note": f"{type(e).__name__}: {e}"})


def measure(plan, log=print):
    """(rows, calibrations) of every method of the plan on every model."""
    from .solvers import available
    rows, records = [], []
    with fresh_calibration_store() as folder:
        for name in available(plan):
            grid = plan[name]
            start = time.perf_counter()
            methods = grid["methods"]
            if "ParaDiGMS" in methods or "Bottleneck" in methods:
                runner = Runner(name, grid["seeds"], grid["digits"], grid["rtol"], grid["repeats"])
                if "ParaDiGMS" in methods:
                    measure_paradigms(runner, grid, rows)
                if "Bottleneck" in methods:
                    measure_bottleneck(runner, grid, rows)
            for digit in grid["classes"]:
                if "teleportation" in methods or "ReDi" in methods:
                    runner = Runner(name, grid["class_seeds"], [digit], grid["rtol"], 1)
                    if "teleportation" in methods:
                        measure_teleport(runner, grid, digit, rows, records, folder)
                    if "ReDi" in methods:
                        measure_redi(runner, grid, digit, rows, records, folder)
            log(f"{name}: {time.perf_counter() - start:.0f} s")
    return rows, records


# --- tables --------------------------------------------------------------------------------------------------------

def _err(r):
    if r is None or r.get("error") is None:
        return "n/a"
    if not math.isfinite(r["error"]):
        return "diverged"
    return f"{r['error']:.3g} / {r['median_error']:.3g}"


def _na(r):
    note = r["note"]
    return f"n/a: {note}" if not note.startswith("n/a") else note


def paradigms_table(rows):
    lines = ["| model | steps | window | sequential rounds: ParaDiGMS / DDIM | model evaluations per image: ParaDiGMS "
             "/ DDIM | counted model calls (batched) | wall s: ParaDiGMS / DDIM | wall ratio DDIM / ParaDiGMS | "
             "error ParaDiGMS | error DDIM (same steps) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["method"] != "ParaDiGMS":
            continue
        b = r["baseline"]
        head = f"| {r['model']} | {r['steps']} | {r['window']} |"
        if r.get("error") is None:
            lines.append(f"{head} {_na(r)} | | | | | | {_err(b)} |")
            continue
        lines.append(f"{head} {r['rounds']} / {b['nfe']} | {r['evaluations']} / {b['nfe']} | {r['nfe']} | "
                     f"{r['seconds']:.3f} / {b['seconds']:.3f} | {r['wall_ratio']:.2f} | {_err(r)} | {_err(b)} |")
    return "\n".join(lines)


def bottleneck_table(rows):
    lines = ["| model | steps | setting | stage steps (sizes) | NFE: Bottleneck / euler | compute vs full resolution "
             "(by latent area) | wall s: Bottleneck / euler | wall ratio euler / Bottleneck | error Bottleneck | "
             "error euler (same steps) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["method"] != "Bottleneck":
            continue
        b = r["baseline"]
        head = f"| {r['model']} | {r['steps']} | {r['setting']} |"
        if r.get("error") is None:
            lines.append(f"{head} {_na(r)} | | | | | | {_err(b)} |")
            continue
        stages = ", ".join(f"{n} ({s[-2]}x{s[-1]})" for n, s in zip(r["stage_steps"], r["sizes"]))
        lines.append(f"{head} {stages} | {r['nfe']} / {b['nfe']} | {r['compute']:.0f}% | "
                     f"{r['seconds']:.3f} / {b['seconds']:.3f} | {r['wall_ratio']:.2f} | {_err(r)} | {_err(b)} |")
    return "\n".join(lines)


def teleport_table(rows):
    lines = ["| model | class | steps | skip | NFE teleport | steps skipped | error teleport + 2M | error dpmpp_2m, "
             "same NFE | error dpmpp_2m, all steps (NFE) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["method"] != "teleportation":
            continue
        head = f"| {r['model']} | {r['digit']} | {r['steps']} | {r['skip']:g} |"
        if r.get("error") is None:
            lines.append(f"{head} {_na(r)} | | | {_err(r['baseline'])} | {_err(r['full'])} ({r['full']['nfe']}) |")
            continue
        skipped = (r["steps"] - r["nfe"]) / r["steps"]
        lines.append(f"{head} {r['nfe']} | {100 * skipped:.0f}% | {_err(r)} | {_err(r['baseline'])} "
                     f"({r['baseline']['nfe']}) | {_err(r['full'])} ({r['full']['nfe']}) |")
    return "\n".join(lines)


def redi_table(rows):
    lines = ["| model | class | steps | key, value step | NFE ReDi | knowledge base (entries) | error ReDi | error "
             "DDIM, same NFE | error DDIM, all steps (NFE) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["method"] != "ReDi":
            continue
        head = f"| {r['model']} | {r['digit']} | {r['steps']} | {r['key_step']}, {r['value_step']} |"
        if r.get("error") is None:
            lines.append(f"{head} {_na(r)} | | | {_err(r['baseline'])} | {_err(r['full'])} ({r['full']['nfe']}) |")
            continue
        entries = r["build"].get("entries") or r["samples"]
        lines.append(f"{head} {r['nfe']} | {entries} | {_err(r)} | {_err(r['baseline'])} ({r['baseline']['nfe']}) "
                     f"| {_err(r['full'])} ({r['full']['nfe']}) |")
    return "\n".join(lines)


def cost_table(records):
    lines = ["| node | model | class | steps | samples | options | model calls on the batch of samples (counted) | "
             "node's own count / seconds | seconds | knowledge-base entries | in-sample error: calibrated / "
             "uncalibrated |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in records:
        options = ", ".join(f"{k} {v}" for k, v in c["options"].items())
        lines.append(f"| {c['node']} | {c['model']} | {c['digit']} | {c['steps'] or 'any'} | {c['samples']} | {options} | "
                     f"{c['evaluations']} | {c.get('node_evaluations')} / {c.get('node_seconds')} | "
                     f"{c['wall_seconds']:.1f} | "
                     f"{c.get('entries') or ''} | " + (f"{c['error']:.3g} / {c['base_error']:.3g}"
                                                       if c.get("error") is not None else "") + " |")
    return "\n".join(lines)


def _span(values, fmt):
    values = sorted(values)
    if not values:
        return "none measured"
    return fmt(values[0]) if len(values) == 1 else f"{fmt(values[0])} .. {fmt(values[-1])}"


def anchors(rows):
    par = [r["wall_ratio"] for r in rows if r["method"] == "ParaDiGMS" and r.get("error") is not None]
    rnd = [r["log_steps"] / r["rounds"] for r in rows if r["method"] == "ParaDiGMS" and r.get("error") is not None]
    bot = [r["wall_ratio"] for r in rows if r["method"] == "Bottleneck" and r.get("error") is not None]
    tel = [r for r in rows if r["method"] == "teleportation" and r.get("error") is not None]
    skips = [(r["steps"] - r["nfe"]) / r["steps"] for r in tel]
    ratios = [r["error"] / r["baseline"]["error"] for r in tel if r["baseline"]["error"] > 0]
    x = lambda v: f"{v:.2f}x"
    return [f"- ParaDiGMS: {ANCHORS['ParaDiGMS']}; measured here (CPU, 1 thread): wall-time ratio DDIM / ParaDiGMS "
            f"{_span(par, x)}, sequential rounds {_span(rnd, x)} fewer.",
            f"- Bottleneck: {ANCHORS['Bottleneck']}; measured here (CPU, 8x8 latents): wall-time ratio euler / "
            f"Bottleneck {_span(bot, x)}.",
            f"- Teleportation: {ANCHORS['teleportation']}; measured here: {_span(skips, lambda v: f'{100 * v:.0f}%')} "
            f"of the steps skipped, error over dpmpp_2m at the same NFE {_span(ratios, x)}."]


def report(data, title):
    rows, records, plan = data["rows"], data["calibrations"], data["plan"]
    print(f"\n## {title}\n")
    print(f"All runs at cfg {CFG:g}, on the scheduler {SCHEDULER['eps']} (EPS models) or {SCHEDULER['flow']} (flow "
          "models); errors are mean / median per-image RMSE vs x_ref in data standard deviations, x_ref solved from "
          "the same noise and conditioning. NFE and model calls counted inside the model (a CFG pair counts once). "
          "Wall times: the fastest of " + ", ".join(f"{m} {p['repeats']}" for m, p in plan.items()) +
          " runs, CPU, one thread, a shared 2-core machine. Evaluation images: "
          + "; ".join(f"{m}: " + ", ".join(
              ([f"digits 0-9 x seeds {p['seeds']} (ParaDiGMS, Bottleneck)"]
               if {"ParaDiGMS", "Bottleneck"} & set(p["methods"]) else []) +
              ([f"digit classes {p['classes']} x seeds {p['class_seeds']} (teleportation, ReDi; calibrated on "
                f"{p['teleport_samples']} / {p['redi_samples']} noises)"]
               if {"teleportation", "ReDi"} & set(p["methods"]) else [])) for m, p in plan.items()) +
          f". Calibrations: seed {CAL_SEED}, one digit class each, in a fresh calibration store.\n")
    print("### Anchors (the papers' numbers as quoted, beside the measured ones)\n")
    print("\n".join(anchors(rows)))
    print("\n### ParaDiGMS (window x tolerance " + ", ".join(sorted({f"{p['tolerance']:g}" for p in plan.values()}))
          + ") vs sequential DDIM at the same steps\n")
    print("ParaDiGMS evaluates a window of steps in one batched model call: 'sequential rounds' are those calls "
          "(what bounds wall time on a device with idle batch capacity), 'model evaluations per image' the rows "
          "evaluated (from the node's log). On this CPU a batch of W rows costs about W times one row, so there is "
          "no wall-time gain to expect here; no GPU number is given.\n")
    print(paradigms_table(rows))
    print("\n### Bottleneck Sampling (low_scale 0.5, high -> low -> high) vs euler at the same steps\n")
    print("The compute fraction is the node's own (model evaluations weighted by latent area). 'n/a' where the "
          "model does not accept the half-size latent (the oracle's mixture is defined on 4x8x8 latents only).\n")
    print(bottleneck_table(rows))
    print("\n### Analytical teleportation (jump, then DPM-Solver++ 2M) vs dpmpp_2m\n")
    print(teleport_table(rows))
    print("\n### ReDi (DDIM with retrieved steps) vs DDIM\n")
    print(redi_table(rows))
    print("\n### Calibration cost (teleportation statistics, ReDi knowledge bases)\n")
    print(cost_table(records))


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--models", help=f"comma-separated subset of {', '.join(MODELS)}")
    p.add_argument("--tables-from", metavar="A.json,B.json", help="print the tables of earlier --json runs")
    args = p.parse_args()
    if args.tables_from:
        data = read_merged(args.tables_from)
        report(data, f"Structural accelerators on the demo models ({args.tables_from})")
        return
    models = args.models.split(",") if args.models else list(QUICK if args.quick else DEFAULT)
    unknown = set(models) - set(MODELS)
    if unknown:
        p.error(f"unknown models {sorted(unknown)}; choose from {list(MODELS)}")
    base = QUICK if args.quick else MODELS
    plan = {m: base.get(m, MODELS[m]) for m in models}
    host.boot()
    start = time.perf_counter()
    rows, records = measure(plan)
    run = {"quick": args.quick, "seconds": time.perf_counter() - start, "calibration_seed": CAL_SEED, "cfg": CFG}
    data = {"plan": plan, "run": run, "rows": rows, "calibrations": records}
    report(data, f"Structural accelerators on the demo models ({'quick' if args.quick else 'full'} run, "
                 f"{run['seconds']:.0f} s)")
    write_json(args.json, data)


if __name__ == "__main__":
    main()
