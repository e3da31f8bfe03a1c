"""Autotune beside the best built-in sampler x scheduler, on evaluation noises it never saw.

    .venv/bin/python -m bench.autotune [--quick] [--models a,b] [--json PATH] [--tables-from PATH]

For each model, cfg and NFE: the Autotune node runs on its own calibration noises (seed 1000; half fit, half judge)
and returns a SAMPLER + SIGMAS; that winner, every built-in sampler x scheduler of the same grid at the same NFE, and
the best of them at NFE 10, are measured on the evaluation noises (digits 0-9 x seeds 0, 1) against x_ref (the
exact oracle's, or the network's own ODE at tolerance 1e-5). The best built-in is chosen on the evaluation noises
themselves: a baseline Autotune cannot see, so the ratio is conservative. Error = per-image RMSE in data std.
"""
import json
import math
import time

import torch

from . import host
from .common import ModelSetup, fresh_calibration_store, parser, read_merged, run_against_reference, write_json
from .solvers import available

SAMPLERS = ["euler", "heun", "dpm_2", "dpmpp_2m", "uni_pc_bh2", "deis", "ipndm"]
SCHEDULERS = ["karras", "exponential", "simple", "beta", "sgm_uniform", "kl_optimal", "normal"]
TWO_PER_STEP = {"heun", "dpm_2"}  # 2 evaluations per step, 1 on the last
REFERENCE_NFE = 10
SETTINGS = {"oracle_eps": [1.0, 5.5], "oracle_flow": [1.0, 5.5], "unet_small": [1.0, 3.0], "dit_small": [1.0, 3.0]}
FULL = {"nfes": [4, 5, 8], "samples": 16, "budget": 6000, "iterations": 100, "seeds": [0, 1], "cal_seed": 1000,
        "methods": "stride, ld3, iia, bespoke, dpm_solver_v3, dc_solver"}
QUICK = {**FULL, "nfes": [5], "samples": 16, "budget": 3000, "iterations": 40, "seeds": [0], "methods": "ld3, iia"}
QUICK_SETTINGS = {"oracle_flow": [3.0]}
RTOL = {"oracle": 1e-7}


def steps_for(name, nfe):
    return (nfe + 1) // 2 if name in TWO_PER_STEP else nfe


def builtins(setup, references, cfg, nfe, rtol, data_std):
    """{label: (error, counted nfe)} of every built-in sampler x scheduler at this NFE on the evaluation noises."""
    import comfy.samplers
    compare = host.stride("nodes.compare")
    out = {}
    for name in SAMPLERS:
        for scheduler in SCHEDULERS:
            sigmas = compare.schedule(setup.model_sampling, name, scheduler, steps_for(name, nfe))
            err, counter, _ = run_against_reference(setup, references, comfy.samplers.sampler_object(name), sigmas,
                                                    cfg, rtol, data_std)
            if counter.nfe <= nfe:
                out[f"{name} / {scheduler}"] = float(err.mean())
    return out


def best(errors):
    """(label, error) of the lowest finite error; a run that failed counts as a loss (inf), never as a win."""
    finite = {k: v for k, v in errors.items() if math.isfinite(v)}
    return min(finite.items(), key=lambda kv: kv[1]) if finite else ("none ran", math.inf)


def measure(plan, mode):
    node = host.node("StrideAutotune")
    rows = []
    for name in available(list(plan)):
        setup = ModelSetup(name, mode["seeds"])
        data_std = setup.mixture.data_std()
        rtol = RTOL["oracle"] if setup.is_oracle else 1e-5
        for cfg in plan[name]:
            references = {}
            at_ten = best(builtins(setup, references, cfg, REFERENCE_NFE, rtol, data_std))
            for nfe in mode["nfes"]:
                with fresh_calibration_store():
                    start = time.perf_counter()
                    with torch.inference_mode():
                        out = node.execute(setup.model, setup.positive, setup.negative, {"samples": setup.latent}, cfg, nfe,
                                           mode["budget"], mode["samples"], mode["cal_seed"], ", ".join(SAMPLERS),
                                           ", ".join(SCHEDULERS), mode["methods"], mode["iterations"]).result
                    seconds = time.perf_counter() - start
                    store = host.stride("nodes.calibration_store")
                    path = next(iter(store.paths("autotune")))
                    info = store.read(path, tensors=False)[1]["info"]
                sampler, sigmas, _, text, _ = out
                err, counter, _ = run_against_reference(setup, references, sampler, sigmas, cfg, rtol, data_std)
                grid = builtins(setup, references, cfg, nfe, rtol, data_std)
                label, base = best(grid)
                winner = json.loads(text)
                rows.append({"model": name, "cfg": cfg, "nfe": nfe, "winner": winner["label"], "kind": winner["kind"],
                             "error": float(err.mean()) if counter.nfe <= nfe else math.inf,
                             "counted_nfe": counter.nfe, "tune_error": winner["error"],
                             "best_builtin": label, "builtin_error": base, "best_at_10": at_ten[0],
                             "error_at_10": at_ten[1], "tune_evaluations": info["evaluations"],
                             "tune_seconds": round(seconds, 1), "bespoke": bespoke_vs_base(info["rows"])})
                print(f"{name} cfg {cfg} NFE {nfe}: {winner['label']} {rows[-1]['error']:.4g} vs {label} {base:.4g} "
                      f"({seconds:.0f} s)", flush=True)
    return rows


def bespoke_vs_base(rows):
    """(Bespoke label, its held-out error / its base's: dpm_2 (rk2) or euler (rk1) on the same scheduler), or None."""
    by = {r["label"]: r for r in rows}
    out = []
    for r in rows:
        if r["label"].startswith("Bespoke ") and r["status"] == "ok":
            base, scheduler = r["label"].split(" ")[1].split(" / ")[0], r["label"].split(" / ")[1]
            twin = by.get(f"{'dpm_2' if base == 'rk2' else 'euler'} / {scheduler}")
            if twin and twin["status"] == "ok" and twin["error"] > 0:
                out.append([r["label"], r["error"] / twin["error"]])
    return out


def fmt(x):
    return f"{x:.3g}" if math.isfinite(x) else "failed"


def table(rows):
    lines = ["| model | cfg | NFE | Autotune's winner | error | best built-in at this NFE | error | ratio | best "
             f"built-in at NFE {REFERENCE_NFE} | error | winner / NFE {REFERENCE_NFE} | tuning (evaluations, s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["error"] / r["builtin_error"] if math.isfinite(r["builtin_error"]) else math.inf
        at_ten = r["error"] / r["error_at_10"] if math.isfinite(r["error_at_10"]) else math.inf
        lines.append(f"| {r['model']} | {r['cfg']:g} | {r['nfe']} | {r['winner']} | {fmt(r['error'])} | "
                     f"{r['best_builtin']} | {fmt(r['builtin_error'])} | {fmt(ratio)} | {r['best_at_10']} | "
                     f"{fmt(r['error_at_10'])} | {fmt(at_ten)} | {r['tune_evaluations']:.0f}, {r['tune_seconds']:.0f} |")
    return "\n".join(lines)


def at_most(a, b, factor=1.0):
    """a <= factor * b, both measured: a run that failed (inf, nan) is a loss, never a win."""
    return math.isfinite(a) and math.isfinite(b) and a <= factor * b


def summary(rows):
    """The issue's targets, recomputed from the rows: at NFE 5, the settings where the winner is <= 0.5x the best
    built-in and <= the best built-in at NFE 10; over all rows, those at or below the best built-in at their NFE."""
    five = [r for r in rows if r["nfe"] == 5]
    return {"nfe5_half": sum(at_most(r["error"], r["builtin_error"], 0.5) for r in five),
            "nfe5_matches_10": sum(at_most(r["error"], r["error_at_10"]) for r in five), "nfe5_settings": len(five),
            "not_worse": sum(at_most(r["error"], r["builtin_error"]) for r in rows), "rows": len(rows)}


def print_tables(data):
    rows = data["rows"]
    print(f"\n## Autotune vs the best built-in ({data['plan_mode']} run)\n")
    print(table(rows) + "\n")
    s = summary(rows)
    print(f"At NFE 5, Autotune's winner is at most half the best built-in's error in {s['nfe5_half']} of "
          f"{s['nfe5_settings']} settings, and at or below the best built-in at NFE {REFERENCE_NFE} in "
          f"{s['nfe5_matches_10']} of {s['nfe5_settings']}; it is at or below the best built-in at its own NFE in "
          f"{s['not_worse']} of {s['rows']} rows.\n")
    bespoke = [(r["model"], r["cfg"], r["nfe"], b) for r in rows for b in r["bespoke"]]
    if bespoke:
        print("Bespoke alone (held-out calibration error over its base's, dpm_2 for rk2 / euler for rk1 on the same "
              "scheduler): " + "; ".join(f"{m} cfg {c:g} NFE {n} {b[0]}: {b[1]:.2f}x" for m, c, n, b in bespoke)
              + "\n")
    print("Errors: the evaluation noises (digits 0-9 x seeds), never seen by Autotune. Tuning: model evaluations of "
          "the calibration batch (backward passes counted as 2) and seconds on this CPU.")


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--models", help=f"comma-separated subset of {', '.join(SETTINGS)}")
    p.add_argument("--tables-from", metavar="PATH", help="print the tables of an earlier --json run")
    args = p.parse_args()
    if args.tables_from:
        data = read_merged(args.tables_from)
        data["plan_mode"] = data["run"].get("mode", "full")
        print_tables(data)
        return
    mode = QUICK if args.quick else FULL
    plan = QUICK_SETTINGS if args.quick else SETTINGS
    if args.models:
        plan = {m: SETTINGS[m] for m in args.models.split(",")}
    host.boot()
    start = time.perf_counter()
    rows = measure(plan, mode)
    data = {"plan": {k: {"cfgs": v, **mode} for k, v in plan.items()}, "rows": rows,
            "run": {"mode": "quick" if args.quick else "full", "seconds": round(time.perf_counter() - start)}}
    data["plan_mode"] = data["run"]["mode"]
    print_tables(data)
    write_json(args.json, data)


if __name__ == "__main__":
    main()
