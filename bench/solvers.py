"""Stride's samplers beside ComfyUI's own samplers x schedulers on the demo models, error against x_ref per NFE.

    .venv/bin/python -m bench.solvers [--quick] [--models a,b] [--json PATH] [--tables-from A.json,B.json]
    .venv/bin/python -m bench.solvers --calibrated [--quick] [--models a,b] [--samples N] [--json PATH]
                                      [--tables-from A.json,B.json]

Error = per-image RMSE over the latent against x_ref (the guided PF-ODE solved to the model's
sigma_min with the reference solver from the same noise, then denoised: analytic for the exact oracle,
the network's own ODE at tolerance 1e-5 for the trained models), in units of the data standard
deviation, averaged over digits 0-9 x seeds. NFE is counted inside the model (a CFG pair counts once).
"""
import json
import math
import os
import time

from . import host
from .common import ModelSetup, error_ratio, parser, run_against_reference, write_json

# label -> (ComfyUI sampler name, extra options or None for sampler_object(), evaluations per step)
SAMPLERS = {
    "euler": ("euler", {}, 1),
    "heun": ("heun", {}, 2),
    "dpmpp_2m": ("dpmpp_2m", {}, 1),
    "dpmpp_3m_sde eta=0": ("dpmpp_3m_sde", {"eta": 0.0}, 1),
    "uni_pc*": ("uni_pc", None, 1),
    "uni_pc_bh2*": ("uni_pc_bh2", None, 1),
    "deis": ("deis", {}, 1),
    "ipndm": ("ipndm", {}, 1),
    "res_multistep": ("res_multistep", {}, 1),
    "gradient_estimation": ("gradient_estimation", {}, 1),
}
# Stride methods: label -> (stride_* name, option overrides, the base solver it modifies). Bases name a label of
# SAMPLERS or of STRIDE; the method is compared with its base on the same scheduler and NFE.
STRIDE = {
    "stride_dpmpp_2m": ("stride_dpmpp_2m", {}, "dpmpp_2m"),
    "stride_dpmpp_3m": ("stride_dpmpp_3m", {}, "dpmpp_3m_sde eta=0"),
    "stride_unipc": ("stride_unipc", {}, "uni_pc*"),
    "stride_unipc_bh2": ("stride_unipc_bh2", {}, "uni_pc_bh2*"),
    "stride_ddim_dualfast": ("stride_ddim_dualfast", {}, "euler"),
    "stride_dpmpp_2m_dualfast": ("stride_dpmpp_2m_dualfast", {}, "stride_dpmpp_2m"),
    "stride_dpmpp_2m_dualfast s=0.25": ("stride_dpmpp_2m_dualfast", {"dualfast": 0.25}, "stride_dpmpp_2m"),
    "stride_dpmpp_2m_dualfast s=1": ("stride_dpmpp_2m_dualfast", {"dualfast": 1.0}, "stride_dpmpp_2m"),
    "stride_unipc_dualfast": ("stride_unipc_dualfast", {}, "stride_unipc_bh2"),
    "stride_dpmpp_2m_hb": ("stride_dpmpp_2m_hb", {}, "stride_dpmpp_2m"),
    "stride_plms_hb": ("stride_plms_hb", {}, "ipndm"),
    "stride_ghvb": ("stride_ghvb", {}, "ipndm"),
    "stride_dpmpp_2m_ts": ("stride_dpmpp_2m_ts", {}, "stride_dpmpp_2m"),
    "stride_flowturbo": ("stride_flowturbo", {}, "heun"),
    "stride_mixed_sde": ("stride_mixed_sde", {}, "euler"),
}
SCHEDULERS = ["simple", "karras", "exponential", "beta", "sgm_uniform", "kl_optimal"]
SCHEDULE_NODES = {"AYS (SD1)": ("AlignYourStepsScheduler", {"model_type": "SD1"}),
                  "GITS 1.20": ("GITSScheduler", {"coeff": 1.20})}   # EPS (SD1.5 schedule) only
NFES = [4, 5, 6, 8, 10, 15, 20]
ORACLE_GRID = {"samplers": list(SAMPLERS), "schedulers": SCHEDULERS + list(SCHEDULE_NODES), "nfes": NFES,
               "stride": list(STRIDE), "cfgs": [1.0, 5.5], "seeds": [0, 1], "rtol": 1e-8}
NETWORK_GRID = {"samplers": ["euler", "heun", "dpmpp_2m", "dpmpp_3m_sde eta=0", "uni_pc*", "uni_pc_bh2*", "deis",
                             "ipndm"],
                "schedulers": ["simple", "karras", "exponential", "beta", "AYS (SD1)"], "nfes": [4, 6, 8, 10, 15, 20],
                "stride": list(STRIDE), "cfgs": [1.0, 3.0], "seeds": [0, 1], "rtol": 1e-5}
FULL = {"oracle_eps": ORACLE_GRID, "oracle_flow": ORACLE_GRID, "unet_large": NETWORK_GRID,
        "unet_small": NETWORK_GRID, "dit_large": NETWORK_GRID, "dit_small": NETWORK_GRID}
_QUICK_ORACLE = {"samplers": ["euler", "heun", "dpmpp_2m", "uni_pc*", "deis"], "schedulers": ["simple", "karras"],
                 "stride": ["stride_dpmpp_2m", "stride_unipc_bh2", "stride_ghvb"], "stride_schedulers": 1,
                 "nfes": [4, 6, 10, 20], "cfgs": [1.0, 5.5], "seeds": [0], "rtol": 1e-7}
_QUICK_NETWORK = {"samplers": ["euler", "dpmpp_2m"], "schedulers": ["karras"], "nfes": [4, 10], "cfgs": [3.0],
                  "stride": ["stride_dpmpp_2m_dualfast"], "stride_schedulers": 1,
                  "seeds": [0], "rtol": 1e-4}
QUICK = {"oracle_eps": _QUICK_ORACLE, "oracle_flow": _QUICK_ORACLE, "unet_small": _QUICK_NETWORK,
         "dit_small": _QUICK_NETWORK}
EPS_MODELS = {"oracle_eps", "unet_large", "unet_small"}  # AYS/GITS are SD1.5-schedule nodes
# Stride's methods run on two schedulers per family: ComfyUI's usual default and the best in its own baseline
# (a plan's "stride_schedulers": 1 keeps the first only).
STRIDE_SCHEDULERS = {"eps": ["karras", "exponential"], "flow": ["simple", "beta"]}
ORACLE_MODELS = {"oracle_eps", "oracle_flow"}


def sampler_object(label):
    import comfy.samplers
    if label in STRIDE:
        name, options, _ = STRIDE[label]
        return host.stride("nodes.sampler_bridge").stride_sampler(name, **options)
    name, options, _ = SAMPLERS[label]
    return comfy.samplers.sampler_object(name) if options is None else comfy.samplers.ksampler(name, options)


def steps_for(label, nfe):
    if label == "stride_flowturbo":  # n steps cost n + heun_steps evaluations
        name, options, _ = STRIDE[label]
        heun = {**host.stride("nodes.sampler_bridge").KSAMPLERS[name][1], **options}["heun_steps"]
        return max(nfe - heun, 2)
    if label in STRIDE:
        return nfe
    per_step = SAMPLERS[label][2]
    return nfe if per_step == 1 else (nfe + 1) // 2  # Heun's last step is a plain Euler step


def schedule(model_sampling, label, scheduler, steps):
    """Sigmas as a user gets them: KSampler's handling for named schedulers (the compare node's), the node's
    output otherwise."""
    import nodes
    if scheduler in SCHEDULE_NODES:
        node_id, options = SCHEDULE_NODES[scheduler]
        return nodes.NODE_CLASS_MAPPINGS[node_id].execute(steps=steps, denoise=1.0, **options).result[0]
    name = (STRIDE.get(label) or SAMPLERS[label])[0]
    return host.stride("nodes.compare").schedule(model_sampling, name, scheduler, steps)


def available(names):
    """The models to measure: trained networks only when their weights are in the repository."""
    nm = host.stride("nodes.neural_models")
    return [n for n in names if n not in nm.SPECS or os.path.exists(nm.weights_path(n))]


def measure(plan):
    rows = []
    for name in available(plan):
        grid = plan[name]
        setup = ModelSetup(name, grid["seeds"])
        data_std = setup.mixture.data_std()
        references = {}
        stride_schedulers = STRIDE_SCHEDULERS["eps" if name in EPS_MODELS else "flow"][:grid.get("stride_schedulers")]
        runs = [(label, sched) for sched in grid["schedulers"] for label in grid["samplers"]] + \
               [(label, sched) for sched in stride_schedulers for label in grid.get("stride", [])]
        for cfg in grid["cfgs"]:
            for label, scheduler in runs:
                if scheduler in SCHEDULE_NODES and name not in EPS_MODELS:
                    continue
                for nfe in grid["nfes"]:
                    steps = steps_for(label, nfe)
                    sigmas = schedule(setup.model_sampling, label, scheduler, steps)
                    err, counter, seconds = run_against_reference(setup, references, sampler_object(label), sigmas,
                                                                  cfg, grid["rtol"], data_std)
                    rows.append({"model": name, "cfg": cfg, "sampler": label, "scheduler": scheduler,
                                 "target_nfe": nfe, "steps": steps, "nfe": counter.nfe,
                                 "uncond_passes": counter.uncond, "error": err.mean().item(),
                                 "median_error": err.median().item(), "seconds": seconds,
                                 "model_seconds": counter.seconds})
    return rows


def settings(rows):
    """(model, cfg) pairs in measurement order."""
    return list(dict.fromkeys((r["model"], r["cfg"]) for r in rows))


def error_table(rows, model, cfg, nfes):
    """Markdown: sampler x scheduler rows, NFE columns of 'mean / median' error; '(n)' marks a counted NFE
    that differs from the column's."""
    lines = ["| sampler | scheduler | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
             "|---|---|" + "---|" * len(nfes)]
    cells = {}
    for r in rows:
        if r["model"] == model and r["cfg"] == cfg:
            mark = "" if r["nfe"] == r["target_nfe"] else f" ({r['nfe']})"
            cells.setdefault((r["sampler"], r["scheduler"]), {})[r["target_nfe"]] = \
                f"{r['error']:.3g} / {r['median_error']:.3g}{mark}"
    for (sampler, scheduler), by_nfe in cells.items():
        lines.append(f"| {sampler} | {scheduler} | " + " | ".join(by_nfe.get(n, "") for n in nfes) + " |")
    return "\n".join(lines)


def best_table(rows, nfes):
    """Markdown: the best sampler/scheduler pair per setting and NFE."""
    lines = ["| model | cfg | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|---|" + "---|" * len(nfes)]
    for model, cfg in settings(rows):
        best = []
        for n in nfes:
            pool = [r for r in rows if r["model"] == model and r["cfg"] == cfg and r["target_nfe"] == n
                    and r["nfe"] <= n]
            top = min(pool, key=lambda r: r["error"], default=None)
            best.append(f"{top['error']:.3g} {top['sampler']}/{top['scheduler']}" if top else "")
        lines.append(f"| {model} | {cfg} | " + " | ".join(best) + " |")
    return "\n".join(lines)


def _errors(rows):
    return {(r["model"], r["cfg"], r["sampler"], r["scheduler"], r["target_nfe"]): r["error"] for r in rows}


TIE = 0.01  # ratios within 1% of 1 are ties (identical algorithms differ by float32 rounding)


def _mark(ratio):
    return f"**{ratio:.2f}**" if ratio < 1 - TIE else f"{ratio:.2f}"


def versus_base(rows):
    """[(model, cfg, method, scheduler, nfe, ratio)]: a Stride method's error over its base's (same scheduler)."""
    errors = _errors(rows)
    out = []
    for (model, cfg, label, scheduler, nfe), err in errors.items():
        if label in STRIDE:
            base = errors.get((model, cfg, STRIDE[label][2], scheduler, nfe))
            if base is not None:
                out.append((model, cfg, label, scheduler, nfe, error_ratio(err, base)))
    return out


def versus_base_summary(rows):
    """Markdown: per Stride method, how often it beats its base solver, on the oracle and on the networks."""
    pairs = versus_base(rows)
    lines = ["| method | base | oracle: wins / ties / losses | oracle: median error ratio | "
             "networks: wins / ties / losses | networks: median error ratio |", "|---|---|---|---|---|---|"]
    for label in dict.fromkeys(p[2] for p in pairs):
        cells = []
        for oracle in (True, False):
            ratios = sorted(p[5] for p in pairs if p[2] == label and (p[0] in ORACLE_MODELS) == oracle)
            wins, losses = sum(r < 1 - TIE for r in ratios), sum(r > 1 + TIE for r in ratios)
            cells += [f"{wins} / {len(ratios) - wins - losses} / {losses}",
                      f"{ratios[len(ratios) // 2]:.3g}" if ratios else ""]
        lines.append(f"| {label} | {STRIDE[label][2]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def versus_base_table(rows, nfes):
    """Markdown: every method / scheduler / setting, error ratio to its base per NFE (< 1: the method wins)."""
    pairs = versus_base(rows)
    lines = ["| model | cfg | method (base) | scheduler | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
             "|---|---|---|---|" + "---|" * len(nfes)]
    cells = {}
    for model, cfg, label, scheduler, nfe, ratio in pairs:
        cells.setdefault((model, cfg, label, scheduler), {})[nfe] = _mark(ratio)
    for (model, cfg, label, scheduler), by_nfe in cells.items():
        lines.append(f"| {model} | {cfg} | {label} ({STRIDE[label][2]}) | {scheduler} | " +
                     " | ".join(by_nfe.get(n, "") for n in nfes) + " |")
    return "\n".join(lines)


def stride_vs_builtin_table(rows, nfes):
    """Markdown: per setting and NFE, the best Stride run's error over the best built-in run's (all schedulers)."""
    lines = ["| model | cfg | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|---|" + "---|" * len(nfes)]
    for model, cfg in settings(rows):
        cells = []
        for n in nfes:
            pool = [r for r in rows if r["model"] == model and r["cfg"] == cfg and r["target_nfe"] == n and r["nfe"] <= n]
            ours = min((r for r in pool if r["sampler"] in STRIDE), key=lambda r: r["error"], default=None)
            theirs = min((r for r in pool if r["sampler"] not in STRIDE), key=lambda r: r["error"], default=None)
            if ours is None or theirs is None:
                cells.append("")
                continue
            ratio = error_ratio(ours["error"], theirs["error"])
            cells.append(f"{_mark(ratio)} {ours['sampler']}/{ours['scheduler']} vs {theirs['sampler']}/{theirs['scheduler']}")
        lines.append(f"| {model} | {cfg} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def overhead_table(rows):
    """Markdown: wall time per step, time inside the model, and the sampler's own overhead per step."""
    lines = ["| model | sampler | ms / step | in model ms / step | overhead ms / step |", "|---|---|---|---|---|"]
    groups = {}
    for r in rows:
        groups.setdefault((r["model"], r["sampler"]), []).append(r)
    for (model, sampler), rs in groups.items():
        rs = [r for r in rs if math.isfinite(r["seconds"])]
        steps = sum(r["steps"] for r in rs)
        total, inside = sum(r["seconds"] for r in rs), sum(r["model_seconds"] for r in rs)
        lines.append(f"| {model} | {sampler} | {1e3 * total / steps:.2f} | {1e3 * inside / steps:.2f} | "
                     f"{1e3 * (total - inside) / steps:.2f} |")
    return "\n".join(lines)


def report(plan, rows, title):
    nfes = sorted({r["target_nfe"] for r in rows})
    print(f"\n## {title}\n")
    print("Errors are mean per-image RMSE vs x_ref in data standard deviations; ratios are Stride's error over the "
          "other's (**bold** < 0.99: Stride wins; within 1% of 1 is a tie). Diverged runs count as infinite error.\n")
    print("### Stride methods against their base solver (same scheduler, same NFE)\n")
    print(versus_base_summary(rows))
    print("\n### Best Stride run against the best built-in run, per NFE (every scheduler)\n")
    print(stride_vs_builtin_table(rows, nfes))
    print("\n### Best sampler/scheduler per NFE, all runs\n")
    print(best_table(rows, nfes))
    print("\n### Every Stride method against its base\n")
    print(versus_base_table(rows, nfes))
    for model, cfg in settings(rows):
        images = len(plan[model]["seeds"]) * 10
        print(f"\n### {model}, cfg {cfg}: mean / median per-image error ({images} images)\n")
        print(error_table(rows, model, cfg, sorted({r["target_nfe"] for r in rows if r["model"] == model})))
    print("\n### Per-step cost (all runs above, CPU, one thread)\n")
    print(overhead_table(rows))
    print("\n`*` uni_pc and uni_pc_bh2 integrate to sigma = 0.001 instead of taking a final denoise, which puts a "
          "floor under their error; with a named scheduler they drop the penultimate sigma, as KSampler does. "
          "stride_mixed_sde takes stochastic steps: part of its error against the ODE's x_ref is the legitimate "
          "difference between an SDE sample and the ODE sample from the same noise.")


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--models", help=f"comma-separated subset of {', '.join(FULL)}")
    p.add_argument("--tables-from", metavar="JSON[,JSON]",
                   help="print the tables from earlier --json outputs (merged) instead of measuring")
    p.add_argument("--calibrated", action="store_true",
                   help="the calibrated solvers (DC-Solver, IIA, DPM-Solver-v3), each calibrated through its node, "
                        "beside UniPC, DPM-Solver++ 2M and the best built-in at NFE 4-10, with the calibration cost")
    p.add_argument("--samples", type=int, help="with --calibrated: calibration noises (default: see bench/calibrated.py)")
    args = p.parse_args()
    if args.calibrated:
        from .calibrated import main_calibrated
        main_calibrated(p, args)
        return
    if args.tables_from:
        plan, rows = {}, []
        for path in args.tables_from.split(","):
            with open(path) as f:
                data = json.load(f)
            plan.update(data["plan"])
            rows += data["rows"]
        report(plan, rows, f"Stride samplers beside ComfyUI's on the demo models ({args.tables_from})")
        return
    plan = QUICK if args.quick else FULL
    if args.models:
        unknown = set(args.models.split(",")) - set(plan)
        if unknown:
            p.error(f"unknown models {sorted(unknown)}; choose from {list(plan)}")
        plan = {name: plan[name] for name in args.models.split(",")}
    host.boot()
    start = time.perf_counter()
    rows = measure(plan)
    report(plan, rows, f"Stride samplers beside ComfyUI's on the demo models ({'quick' if args.quick else 'full'} "
                       f"run, {time.perf_counter() - start:.0f} s)")
    write_json(args.json, {"plan": plan, "rows": rows})


if __name__ == "__main__":
    main()
