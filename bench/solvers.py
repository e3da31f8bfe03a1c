"""Stride's samplers beside ComfyUI's own samplers x schedulers on the demo models, error against x_ref per NFE.

    .venv/bin/python -m bench.solvers [--quick] [--models a,b] [--json PATH] [--tables-from A.json,B.json]
    .venv/bin/python -m bench.solvers --calibrated [--quick] [--models a,b] [--samples N] [--json PATH]
                                      [--tables-from A.json,B.json]

Error = per-image RMSE over the latent against x_ref (the guided PF-ODE solved to the model's
sigma_min with the reference solver from the same noise, then denoised: analytic for the exact oracle,
the network's own ODE at tolerance 1e-5 for the trained models), in units of the data standard
deviation, averaged over digits 0-9 x seeds. NFE is counted inside the model (a CFG pair counts once).
"""
import contextlib
import json
import math
import os
import shutil
import tempfile
import time

import torch

from . import host
from .common import ModelSetup, parser, write_json
from .reference import error_vs_reference

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
    not_finite = host.stride("nodes.sampler_bridge").SampleNotFinite
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
                    key = (cfg, round(float(sigmas[0]), 5))
                    if key not in references:
                        references[key] = setup.reference(sigmas[0], cfg, grid["rtol"])
                    try:
                        x, counter, seconds = setup.sample(sampler_object(label), sigmas, cfg)
                        err = error_vs_reference(x, references[key], data_std)
                    except not_finite:  # a Stride sampler stops instead of returning NaN: report it diverged
                        x, counter, seconds = None, setup.last_counter, float("nan")
                        err = torch.full([1], float("inf"))
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


def _ratio(a, b):
    if not math.isfinite(a):
        return math.inf
    return a / b if b > 0 and math.isfinite(b) else 0.0


def versus_base(rows):
    """[(model, cfg, method, scheduler, nfe, ratio)]: a Stride method's error over its base's (same scheduler)."""
    errors = _errors(rows)
    out = []
    for (model, cfg, label, scheduler, nfe), err in errors.items():
        if label in STRIDE:
            base = errors.get((model, cfg, STRIDE[label][2], scheduler, nfe))
            if base is not None:
                out.append((model, cfg, label, scheduler, nfe, _ratio(err, base)))
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
            ratio = _ratio(ours["error"], theirs["error"])
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


# ---------------------------------------------------------------------------------------------------------------
# --calibrated: the calibrated solvers (DC-Solver, IIA, DPM-Solver-v3) beside UniPC, DPM-Solver++ 2M and the best
# built-in sampler/scheduler, each calibrated through its node on the model it is measured on.
# ---------------------------------------------------------------------------------------------------------------

CAL_SCHEDULER = {"eps": "karras", "flow": "simple"}  # the calibrated solvers' (and their bases') scheduler
CAL_NFES = [4, 5, 6, 8, 10]
CAL_SAMPLES, CAL_QUICK_SAMPLES = 8, 2  # calibration noises
CAL_SEED = 1000  # the calibration noises' seed; the evaluation noises come from seeds 0, 1, ...
# Stride's uncalibrated twins of the calibrated solvers (the same code with no calibration, on the same sigmas):
# label -> (stride_* name, option overrides)
CAL_BASES = {"UniPC-2 bh2 (Stride)": ("stride_unipc_bh2", {"order": 2}),
             "DPM-Solver++ 2M (Stride)": ("stride_dpmpp_2m", {}),
             "DDIM (Stride)": ("stride_ddim_dualfast", {"dualfast": 0.0})}
# label -> calibrate node, sampler node, calibrate options, sampler options, evaluations per step, what one
# calibration serves ("nfe": one step count; "setting": every NFE of the model and cfg), the uncalibrated base
# (a CAL_BASES label, or a SAMPLERS label run on the same scheduler)
CAL_METHODS = {
    "DC-Solver (UniPC-2 bh2)": ("StrideCalibrateDCSolver", "StrideSamplerDCSolver", {"solver": "unipc"}, {}, 1,
                                "nfe", "UniPC-2 bh2 (Stride)"),
    "IIA (DPM-Solver++ 2M)": ("StrideCalibrateIIA", "StrideSamplerIIA", {"base": "dpmpp_2m", "target": "reference"},
                              {}, 1, "nfe", "DPM-Solver++ 2M (Stride)"),
    "IIA (DDIM)": ("StrideCalibrateIIA", "StrideSamplerIIA", {"base": "ddim", "target": "reference"}, {}, 1, "nfe",
                   "DDIM (Stride)"),
    "IIA (Heun)": ("StrideCalibrateIIA", "StrideSamplerIIA", {"base": "heun", "target": "reference"}, {}, 2, "nfe",
                   "heun"),
    "DPM-Solver-v3 per-channel": ("StrideCalibrateDPMSolverV3", "StrideSamplerDPMSolverV3",
                                  {"statistics": "per_channel"}, {"order": 2, "corrector": "on"}, 1, "setting",
                                  "dpmpp_2m"),
    "DPM-Solver-v3 per-element": ("StrideCalibrateDPMSolverV3", "StrideSamplerDPMSolverV3",
                                  {"statistics": "per_element"}, {"order": 2, "corrector": "on"}, 1, "setting",
                                  "dpmpp_2m"),
}
CAL_SERVES = {"nfe": "one NFE", "setting": "every NFE"}
# The rows of the error table: (label, kind, name); kind "builtin": a SAMPLERS label on the calibrated solvers'
# scheduler, "best": the best built-in run of the column (any sampler of the pool, any scheduler).
CAL_TABLE = ([(f"{s} (ComfyUI)", "builtin", s) for s in ("uni_pc*", "uni_pc_bh2*", "dpmpp_2m", "euler", "heun")]
             + [("best built-in (sampler/scheduler)", "best", None)]
             + [(f"{b}, uncalibrated", "base", b) for b in CAL_BASES]
             + [(m, "calibrated", m) for m in CAL_METHODS])
# Papers' numbers (latent MSE against their ground truth at 5 NFE, guidance 7.5): (method, base, where)
PAPER_ANCHORS = {"DC-Solver / UniPC": (0.394, 0.434, "DC-Solver paper (arXiv:2409.03755), SD2.1, NFE 5, cfg 7.5"),
                 "DPM-Solver-v3 / DPM-Solver++": (0.55, 0.60, "DPM-Solver-v3 paper (arXiv:2310.13268), SD1.4, "
                                                              "NFE 5, cfg 7.5")}
ANCHOR_NFE = 5
# Ratio rows: (label, numerator, denominator, paper anchor or None); names as in cal_value()
CAL_RATIOS = [("DC-Solver / UniPC-2 bh2 (its base)", "DC-Solver (UniPC-2 bh2)", "UniPC-2 bh2 (Stride)",
               "DC-Solver / UniPC"),
              ("DC-Solver / uni_pc* (ComfyUI)", "DC-Solver (UniPC-2 bh2)", "uni_pc*", "DC-Solver / UniPC"),
              ("v3 per-channel / dpmpp_2m (ComfyUI)", "DPM-Solver-v3 per-channel", "dpmpp_2m",
               "DPM-Solver-v3 / DPM-Solver++"),
              ("v3 per-element / dpmpp_2m (ComfyUI)", "DPM-Solver-v3 per-element", "dpmpp_2m",
               "DPM-Solver-v3 / DPM-Solver++"),
              ("v3 per-element / v3 per-channel", "DPM-Solver-v3 per-element", "DPM-Solver-v3 per-channel", None),
              ("IIA 2M / DPM-Solver++ 2M (Stride, its base)", "IIA (DPM-Solver++ 2M)", "DPM-Solver++ 2M (Stride)",
               None),
              ("IIA DDIM / DDIM (Stride, its base)", "IIA (DDIM)", "DDIM (Stride)", None),
              ("IIA Heun / heun (ComfyUI, its base)", "IIA (Heun)", "heun", None),
              ("best calibrated / best built-in", "best calibrated", "best built-in", None)]

_CAL_ORACLE = {"cfgs": [1.0, 5.5], "seeds": [0, 1], "nfes": CAL_NFES, "rtol": 1e-8, "samplers": list(SAMPLERS),
               "schedulers": ["karras", "exponential", "simple", "beta"]}
_CAL_NETWORK = {"cfgs": [1.0, 3.0], "seeds": [0, 1], "nfes": CAL_NFES, "rtol": 1e-5,
                "samplers": NETWORK_GRID["samplers"], "schedulers": ["karras", "exponential", "simple", "beta"]}
CAL_MODELS = {"oracle_eps": _CAL_ORACLE, "oracle_flow": _CAL_ORACLE, "unet_small": _CAL_NETWORK,
              "dit_small": _CAL_NETWORK, "unet_large": _CAL_NETWORK, "dit_large": _CAL_NETWORK}
CAL_DEFAULT = ["oracle_eps", "oracle_flow", "unet_small", "dit_small"]
CAL_QUICK = {"oracle_eps": {**_CAL_ORACLE, "cfgs": [5.5], "seeds": [0], "nfes": [4, 5], "rtol": 1e-7,
                            "samplers": ["uni_pc*", "uni_pc_bh2*", "dpmpp_2m", "euler", "heun"],
                            "schedulers": ["karras", "simple"]}}


def calibrated_scheduler(name):
    return CAL_SCHEDULER["eps" if name in EPS_MODELS else "flow"]


@contextlib.contextmanager
def fresh_calibration_store():
    """The calibration store pointed at a new empty folder (and only there) while the block runs (as
    bench.schedules does): nothing is reused from earlier runs."""
    import folder_paths
    store = host.stride("nodes.calibration_store")
    store.register()
    saved = folder_paths.folder_names_and_paths[store.FOLDER]
    folder = tempfile.mkdtemp(prefix="stride-bench-calibrations-")
    folder_paths.folder_names_and_paths[store.FOLDER] = ([folder], {".safetensors"})
    try:
        yield folder
    finally:
        folder_paths.folder_names_and_paths[store.FOLDER] = saved
        shutil.rmtree(folder, ignore_errors=True)


def calibration_conditioning(conditioning, samples, digits=10):
    """The conditioning of `samples` calibration images, spread over the digits (rows of the first seed)."""
    rows = torch.linspace(0, digits - 1, samples).round().long()
    return [[t[rows], {k: v[rows] if torch.is_tensor(v) and v.shape[:1] == t.shape[:1] else v
                       for k, v in options.items()}] for t, options in conditioning]


class Calibrations:
    """Runs the calibrate nodes for one model and cfg (model evaluations counted inside the model, wall time
    around the node's execute) and keeps each calibration text for the NFEs it serves."""

    def __init__(self, setup, cfg, scheduler, samples, folder, setting_steps):
        self.setup, self.cfg, self.scheduler, self.samples, self.folder = setup, cfg, scheduler, samples, folder
        self.setting_steps = setting_steps  # the steps a schedule-free calibration reports its own error on
        self.positive = calibration_conditioning(setup.positive, samples)
        self.latent = {"samples": torch.zeros(1, *setup.noise.shape[1:])}
        self.records, self.texts = [], {}

    def text(self, method, steps, nfe):
        """(calibration text or None, error message or None) of the method for this step count."""
        serves = CAL_METHODS[method][5]
        key = (method, steps if serves == "nfe" else None)
        if key not in self.texts:
            self.texts[key] = self._run(method, steps if serves == "nfe" else self.setting_steps, nfe, serves)
        return self.texts[key]

    def _run(self, method, steps, nfe, serves):
        import nodes
        node, _, options, _, _, _, _ = CAL_METHODS[method]
        store = host.stride("nodes.calibration_store")
        model, counter = host.stride("nodes.counting").count_model_calls(self.setup.model)
        before = set(os.listdir(self.folder))
        start = time.perf_counter()
        try:
            with torch.inference_mode():  # as ComfyUI's executor runs every node
                text = nodes.NODE_CLASS_MAPPINGS[node].execute(model, self.positive, self.setup.negative, self.latent,
                                                               self.cfg, self.scheduler, steps, self.samples,
                                                               CAL_SEED, **options).result[0]
        except Exception as e:  # noqa: BLE001  a node that fails here fails for the user too: report it
            return None, f"{type(e).__name__}: {e}"
        wall = time.perf_counter() - start
        new = sorted(set(os.listdir(self.folder)) - before)
        info = store.read(os.path.join(self.folder, new[0]))[1]["info"] if len(new) == 1 else {}
        self.records.append({"model": self.setup.name, "cfg": self.cfg, "method": method, "serves": serves,
                             "steps": steps, "nfe": nfe if serves == "nfe" else None, "samples": self.samples,
                             "evaluations": counter.nfe, "uncond_passes": counter.uncond, "wall_seconds": wall,
                             "node_evaluations": info.get("evaluations"), "node_seconds": info.get("seconds"),
                             "batch_error": info.get("error"), "batch_base_error": info.get("base_error")})
        return text, None


def measure_calibrated(plan, samples=CAL_SAMPLES, log=print):
    """(rows, calibrations). Rows: every built-in sampler x scheduler of the plan's pool, Stride's uncalibrated
    bases and the calibrated solvers on the model's calibrated scheduler, per cfg and NFE; calibrations: one record
    per calibrate-node run (its cost)."""
    import comfy.samplers
    import nodes
    not_finite = host.stride("nodes.sampler_bridge").SampleNotFinite
    bridge = host.stride("nodes.sampler_bridge")
    rows, calibrations = [], []
    with fresh_calibration_store() as folder:
        for name in available(plan):
            grid = plan[name]
            setup = ModelSetup(name, grid["seeds"])
            data_std = setup.mixture.data_std()
            ms, scheduler = setup.model_sampling, calibrated_scheduler(name)
            references = {}

            def run(sampler, sigmas, cfg):
                key = (cfg, round(float(sigmas[0]), 5))
                if key not in references:
                    references[key] = setup.reference(sigmas[0], cfg, grid["rtol"])
                try:
                    x, counter, _ = setup.sample(sampler, sigmas, cfg)
                    err = error_vs_reference(x, references[key], data_std)
                except not_finite:  # a Stride sampler stops instead of returning NaN: report it diverged
                    counter, err = setup.last_counter, torch.full([1], math.inf)
                err = torch.where(torch.isfinite(err), err, torch.full_like(err, math.inf))
                return {"nfe": counter.nfe, "error": err.mean().item(), "median_error": err.median().item(),
                        "mse": err.pow(2).mean().item()}

            for cfg in grid["cfgs"]:
                start = time.perf_counter()
                base = {"model": name, "cfg": cfg}
                for sched in grid["schedulers"]:
                    for label in grid["samplers"]:
                        for nfe in grid["nfes"]:
                            steps = steps_for(label, nfe)
                            sigmas = schedule(ms, label, sched, steps)
                            rows.append({**base, "kind": "builtin", "sampler": label, "scheduler": sched,
                                         "target_nfe": nfe, "steps": steps, **run(sampler_object(label), sigmas, cfg)})
                for label, (stride_name, options) in CAL_BASES.items():
                    for nfe in grid["nfes"]:
                        sigmas = comfy.samplers.calculate_sigmas(ms, scheduler, nfe)
                        rows.append({**base, "kind": "base", "sampler": label, "scheduler": scheduler,
                                     "target_nfe": nfe, "steps": nfe,
                                     **run(bridge.stride_sampler(stride_name, **options), sigmas, cfg)})
                calib = Calibrations(setup, cfg, scheduler, samples, folder, max(min(grid["nfes"]), 3))
                for method, (_, sampler_node, _, sample_options, per_step, _, _) in CAL_METHODS.items():
                    for nfe in grid["nfes"]:
                        steps = nfe if per_step == 1 else (nfe + 1) // 2  # Heun: 2 per step, the last step 1
                        row = {**base, "kind": "calibrated", "sampler": method, "scheduler": scheduler,
                               "target_nfe": nfe, "steps": steps}
                        if steps < 3:
                            rows.append({**row, "error": None, "note": "n/a: a calibration needs 3 steps or more"})
                            continue
                        text, note = calib.text(method, steps, nfe)
                        if text is None:
                            rows.append({**row, "error": None, "note": note})
                            continue
                        sampler = nodes.NODE_CLASS_MAPPINGS[sampler_node].execute(text, **sample_options).result[0]
                        sigmas = comfy.samplers.calculate_sigmas(ms, scheduler, steps)
                        try:
                            rows.append({**row, **run(sampler, sigmas, cfg)})
                        except ValueError as e:  # the sampler refused the calibration: report it
                            rows.append({**row, "error": None, "note": f"ValueError: {e}"})
                calibrations += calib.records
                log(f"{name} cfg {cfg:g}: {time.perf_counter() - start:.0f} s")
    return rows, calibrations


def _finite(r):
    return r is not None and r.get("error") is not None and math.isfinite(r["error"])


def cal_value(rows, model, cfg, name, nfe):
    """The row of `name` in one column: a calibrated method or a Stride base (its label), a SAMPLERS label (on the
    calibrated scheduler), "best built-in" (lowest error of the pool with counted NFE <= the column's, any
    scheduler) or "best calibrated"."""
    pick = [r for r in rows if r["model"] == model and r["cfg"] == cfg and r["target_nfe"] == nfe]
    if name in ("best built-in", "best calibrated"):
        kind = "builtin" if name == "best built-in" else "calibrated"
        pool = [r for r in pick if r["kind"] == kind and _finite(r) and r["nfe"] <= nfe]
        return min(pool, key=lambda r: r["error"], default=None)
    scheduler = calibrated_scheduler(model)
    return next((r for r in pick if r["sampler"] == name and r["scheduler"] == scheduler), None)


def _table_row(rows, model, cfg, kind, name, nfe):
    return cal_value(rows, model, cfg, "best built-in" if kind == "best" else name, nfe)


def calibrated_error_table(rows, model, cfg, nfes):
    """Markdown: one row per CAL_TABLE entry, NFE columns of 'mean / median' error; **bold**: the lowest mean of
    the column; '(n)': a counted NFE that differs from the column's."""
    lines = ["| solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---|" * len(nfes)]
    best = {}
    for n in nfes:
        cells = [_table_row(rows, model, cfg, kind, name, n) for _, kind, name in CAL_TABLE]
        best[n] = min((r["error"] for r in cells if _finite(r) and r["nfe"] <= n), default=None)
    for label, kind, name in CAL_TABLE:
        out = []
        for n in nfes:
            r = _table_row(rows, model, cfg, kind, name, n)
            if r is None:
                out.append("")
            elif r.get("error") is None:
                out.append("n/a" if r["note"].startswith("n/a") else "failed")
            elif not math.isfinite(r["error"]):
                out.append("diverged")
            else:
                mean = f"{r['error']:.3g}"
                mean = f"**{mean}**" if r["error"] == best[n] else mean
                mark = "" if r["nfe"] == n else f" ({r['nfe']})"
                where = f" {r['sampler']}/{r['scheduler']}" if kind == "best" else ""
                out.append(f"{mean} / {r['median_error']:.3g}{mark}{where}")
        lines.append(f"| {label} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def anchor_ratio(key):
    ours, theirs, _ = PAPER_ANCHORS[key]
    return ours / theirs


def _anchor_cell(key):
    if key is None:
        return ""
    ours, theirs, _ = PAPER_ANCHORS[key]
    return f"{ours:g} / {theirs:g} = {anchor_ratio(key):.3f}"


def cal_ratio(rows, model, cfg, numerator, denominator, nfe):
    """MSE of numerator over MSE of denominator in one column (the papers' metric), or None."""
    a, b = cal_value(rows, model, cfg, numerator, nfe), cal_value(rows, model, cfg, denominator, nfe)
    if a is None or b is None or a.get("error") is None or b.get("error") is None:
        return None
    return _ratio(a["mse"], b["mse"])


def _ratio_cell(ratio):
    return "" if ratio is None else (f"**{ratio:.3f}**" if ratio < 1 - TIE else f"{ratio:.3f}")


def calibrated_ratio_table(rows, model, cfg, nfes):
    """Markdown: the comparisons of CAL_RATIOS per NFE as ratios of mean per-image MSE, the papers' anchors beside."""
    lines = ["| MSE ratio | " + " | ".join(f"NFE {n}" for n in nfes) + f" | paper, NFE {ANCHOR_NFE} |",
             "|---|" + "---|" * (len(nfes) + 1)]
    for label, numerator, denominator, anchor in CAL_RATIOS:
        cells = [_ratio_cell(cal_ratio(rows, model, cfg, numerator, denominator, n)) for n in nfes]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_anchor_cell(anchor)} |")
    return "\n".join(lines)


def calibrated_summary_table(rows):
    """Markdown: per comparison, the MSE ratio at the anchors' NFE in every setting, and wins / ties / losses and
    the median ratio over every setting x NFE."""
    pairs = settings(rows)
    lines = ["| MSE ratio | " + " | ".join(f"{m} cfg {c:g}, NFE {ANCHOR_NFE}" for m, c in pairs) +
             f" | paper, NFE {ANCHOR_NFE} | all cells: wins / ties / losses | all cells: median |",
             "|---|" + "---|" * (len(pairs) + 3)]
    for label, numerator, denominator, anchor in CAL_RATIOS:
        cells, every = [], []
        for model, cfg in pairs:
            cells.append(_ratio_cell(cal_ratio(rows, model, cfg, numerator, denominator, ANCHOR_NFE)))
            nfes = sorted({r["target_nfe"] for r in rows if r["model"] == model and r["cfg"] == cfg})
            every += [x for x in (cal_ratio(rows, model, cfg, numerator, denominator, n) for n in nfes)
                      if x is not None]
        every.sort()
        wins, losses = sum(x < 1 - TIE for x in every), sum(x > 1 + TIE for x in every)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_anchor_cell(anchor)} | "
                     f"{wins} / {len(every) - wins - losses} / {losses} | "
                     f"{f'{every[len(every) // 2]:.3f}' if every else ''} |")
    return "\n".join(lines)


def calibration_cost_table(calibrations):
    """Markdown: per method, model and cfg, the calibrations run and what they cost."""
    lines = ["| method | model | cfg | one calibration serves | model evaluations (per calibration) | "
             "model evaluations, total | seconds, total | node's own count / seconds | calibration-batch MSE, "
             "calibrated / uncalibrated |", "|---|---|---|---|---|---|---|---|---|"]
    for method in CAL_METHODS:
        for model, cfg in dict.fromkeys((c["model"], c["cfg"]) for c in calibrations):
            cs = [c for c in calibrations if c["method"] == method and c["model"] == model and c["cfg"] == cfg]
            if not cs:
                continue
            each = ", ".join((f"NFE {c['nfe']}: " if c["nfe"] is not None else "") + f"{c['evaluations']}"
                             for c in cs)
            node = [(c["node_evaluations"], c["node_seconds"]) for c in cs if c["node_evaluations"] is not None]
            node_cell = (f"{sum(e for e, _ in node):g} / {sum(s for _, s in node):.1f}" if len(node) == len(cs)
                         else "")
            batch = [c["batch_error"] / c["batch_base_error"] for c in cs
                     if c["batch_error"] is not None and c["batch_base_error"]]
            batch_cell = (f"{min(batch):.3f}" if len(batch) == 1 else f"{min(batch):.3f} .. {max(batch):.3f}") \
                if batch else ""
            lines.append(f"| {method} | {model} | {cfg:g} | {CAL_SERVES[cs[0]['serves']]} | {each} | "
                         f"{sum(c['evaluations'] for c in cs)} | {sum(c['wall_seconds'] for c in cs):.1f} | "
                         f"{node_cell} | {batch_cell} |")
    return "\n".join(lines)


def calibrated_failures(rows):
    return sorted({f"{r['sampler']} ({r['model']} cfg {r['cfg']:g}, NFE {r['target_nfe']}): {r['note']}"
                   for r in rows if r.get("error") is None and not r["note"].startswith("n/a")})


def report_calibrated(data, title):
    rows, calibrations, run = data["rows"], data["calibrations"], data["run"]
    plan = data["plan"]
    print(f"\n## {title}\n")
    seeds = ", ".join(f"{m} {p['seeds']}" for m, p in plan.items())
    print(f"Calibrated solvers through their nodes (StrideCalibrate* then StrideSampler*), each calibration on "
          f"{run['samples']} noises from seed {run['calibration_seed']} (digits spread over 0-9) in a fresh "
          f"calibration store; evaluation on digits 0-9 x seeds {seeds}, from the same noise and conditioning as "
          f"x_ref. The calibrated solvers and their uncalibrated bases run on "
          f"{CAL_SCHEDULER['eps']} (EPS models) or {CAL_SCHEDULER['flow']} (flow models), the schedule they were "
          f"calibrated for; the best built-in is the lowest error over the samplers x schedulers of the pool "
          f"(counted NFE <= the column's). DC-Solver and IIA are calibrated per model, cfg and NFE; DPM-Solver-v3's "
          f"statistics once per model, cfg and statistics kind, and reused for every NFE (order 2, "
          f"pseudo-corrector on). IIA is fitted to the reference trajectory (the node's default target). Heun-based "
          f"rows take (NFE + 1) // 2 steps (2 evaluations per step, 1 for the last).\n")
    print("### Summary: MSE ratios (calibrated over baseline; **bold** < 0.99)\n")
    print("Ratios of mean per-image MSE against x_ref, the papers' metric (the tables below give RMSE). Paper "
          "anchors, as quoted: " + "; ".join(f"{k}: {v[0]:g} vs {v[1]:g} latent MSE, {v[2]}"
                                             for k, v in PAPER_ANCHORS.items()) + ".\n")
    print(calibrated_summary_table(rows))
    print("\n### Calibration cost (CPU, one thread, a shared 2-core machine)\n")
    print(f"Model evaluations of the calibration batch ({run['samples']} noises; a CFG pair counts once), counted "
          "inside the model; seconds timed around the calibrate node's execute. The node's own count and time are "
          "beside; the last column is the node's report of its fit on the calibration noises themselves "
          "(in-sample).\n")
    print(calibration_cost_table(calibrations))
    for model, cfg in settings(rows):
        nfes = sorted({r["target_nfe"] for r in rows if r["model"] == model and r["cfg"] == cfg})
        images = 10 * len(plan[model]["seeds"])
        print(f"\n### {model}, cfg {cfg:g} ({calibrated_scheduler(model)}): mean / median per-image RMSE vs x_ref, "
              f"in data standard deviations ({images} images)\n")
        print(calibrated_error_table(rows, model, cfg, nfes))
        print(f"\nMSE ratios, {model}, cfg {cfg:g}:\n")
        print(calibrated_ratio_table(rows, model, cfg, nfes))
    problems = calibrated_failures(rows)
    if problems:
        print("\nFailed runs:\n\n" + "\n".join(f"- {p}" for p in problems))
    print("\n`*` uni_pc and uni_pc_bh2 integrate to sigma = 0.001 instead of taking a final denoise, which puts a "
          "floor under their error; with a named scheduler they drop the penultimate sigma, as KSampler does. "
          "'UniPC-2 bh2 (Stride)' is DC-Solver's base (UniPC bh2, order 2, corrector), 'DPM-Solver++ 2M (Stride)' "
          "and 'DDIM (Stride)' are IIA's, each on exactly the sigmas of its calibrated twin. The papers' anchors "
          "are on 512-768 px Stable Diffusion latents at guidance 7.5; here guidance is the cfg of the table.")


def main_calibrated(p, args):
    if args.tables_from:
        data = {"plan": {}, "rows": [], "calibrations": []}
        for path in args.tables_from.split(","):
            with open(path) as f:
                part = json.load(f)
            data["plan"].update(part["plan"])
            data["rows"] += part["rows"]
            data["calibrations"] += part["calibrations"]
            data["run"] = part["run"]
        report_calibrated(data, f"Calibrated solvers on the demo models ({args.tables_from})")
        return
    base = CAL_QUICK if args.quick else CAL_MODELS
    models = args.models.split(",") if args.models else list(CAL_QUICK if args.quick else CAL_DEFAULT)
    unknown = set(models) - set(CAL_MODELS)
    if unknown:
        p.error(f"unknown models {sorted(unknown)}; choose from {list(CAL_MODELS)}")
    plan = {name: base.get(name, CAL_MODELS[name]) for name in models}
    samples = args.samples or (CAL_QUICK_SAMPLES if args.quick else CAL_SAMPLES)
    host.boot()
    start = time.perf_counter()
    rows, calibrations = measure_calibrated(plan, samples)
    run = {"samples": samples, "calibration_seed": CAL_SEED, "quick": args.quick,
           "seconds": time.perf_counter() - start}
    data = {"plan": plan, "run": run, "rows": rows, "calibrations": calibrations}
    report_calibrated(data, f"Calibrated solvers on the demo models ({'quick' if args.quick else 'full'} run, "
                            f"{run['seconds']:.0f} s)")
    write_json(args.json, data)


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--models", help=f"comma-separated subset of {', '.join(FULL)}")
    p.add_argument("--tables-from", metavar="JSON[,JSON]",
                   help="print the tables from earlier --json outputs (merged) instead of measuring")
    p.add_argument("--calibrated", action="store_true",
                   help="the calibrated solvers (DC-Solver, IIA, DPM-Solver-v3), each calibrated through its node, "
                        "beside UniPC, DPM-Solver++ 2M and the best built-in at NFE 4-10, with the calibration cost")
    p.add_argument("--samples", type=int, help=f"with --calibrated: calibration noises (default {CAL_SAMPLES}, "
                                               f"quick {CAL_QUICK_SAMPLES})")
    args = p.parse_args()
    if args.calibrated:
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
