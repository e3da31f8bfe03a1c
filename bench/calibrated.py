"""`bench.solvers --calibrated`: the calibrated solvers (DC-Solver, IIA, DPM-Solver-v3) beside UniPC, DPM-Solver++ 2M
and the best built-in sampler/scheduler, each calibrated through its node on the model it is measured on, with
the calibration cost. Run through bench.solvers (see its docstring); the tables are in docs/bench_calibrated.md.
"""
import math
import os
import time

import torch

from . import host
from .common import ModelSetup, error_ratio, fresh_calibration_store, read_merged, run_against_reference, write_json
from .solvers import (EPS_MODELS, NETWORK_GRID, SAMPLERS, TIE, available, sampler_object, schedule, settings,
                      steps_for)

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
REFUSED = "Refused: "  # a row's note when its node raised nodes.calibrated_fit.Refused (lost to its base)
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
CAL_QUICK = {"oracle_eps": {**_CAL_ORACLE, "cfgs": [1.0], "seeds": [0], "nfes": [4, 5], "rtol": 1e-7,
                            "samplers": ["uni_pc*", "uni_pc_bh2*", "dpmpp_2m", "euler", "heun"],
                            "schedulers": ["karras", "simple"]}}


def calibrated_scheduler(name):
    return CAL_SCHEDULER["eps" if name in EPS_MODELS else "flow"]


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
        text, error, refused = None, None, False
        try:
            with torch.inference_mode():  # as ComfyUI's executor runs every node
                text = nodes.NODE_CLASS_MAPPINGS[node].execute(model, self.positive, self.setup.negative, self.latent,
                                                               self.cfg, self.scheduler, steps, self.samples,
                                                               CAL_SEED, **options).result[0]
        except Exception as e:  # noqa: BLE001  a node that fails here fails for the user too: report it
            refused = isinstance(e, host.stride("nodes.calibrated_fit").Refused)
            error = f"{type(e).__name__}: {e}"  # a refused one's note starts with REFUSED
        wall = time.perf_counter() - start
        new = sorted(set(os.listdir(self.folder)) - before)
        info = store.read(os.path.join(self.folder, new[0]), tensors=False)[1]["info"] if len(new) == 1 else {}
        if text is not None or refused:  # a refused calibration cost the user its evaluations too
            self.records.append({"model": self.setup.name, "cfg": self.cfg, "method": method, "serves": serves,
                                 "steps": steps, "nfe": nfe if serves == "nfe" else None, "samples": self.samples,
                                 "evaluations": counter.cond_rows / self.samples,  # in calibration batches
                                 "uncond_passes": counter.uncond, "wall_seconds": wall, "refused": text is None,
                                 "node_evaluations": info.get("evaluations"), "node_seconds": info.get("seconds"),
                                 "batch_error": info.get("error"), "batch_base_error": info.get("base_error"),
                                 "held_error": info.get("held_out_error"),
                                 "held_base_error": info.get("held_out_base_error")})
        return text, error


def measure_calibrated(plan, samples=CAL_SAMPLES, log=print):
    """(rows, calibrations). Rows: every built-in sampler x scheduler of the plan's pool, Stride's uncalibrated
    bases and the calibrated solvers on the model's calibrated scheduler, per cfg and NFE; calibrations: one record
    per calibrate-node run (its cost)."""
    import comfy.samplers
    import nodes
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
                err, counter, _ = run_against_reference(setup, references, sampler, sigmas, cfg, grid["rtol"],
                                                        data_std)
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
                note = r["note"]
                out.append("n/a" if note.startswith("n/a") else "refused" if note.startswith(REFUSED) else "failed")
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
    return error_ratio(a["mse"], b["mse"])


def _ratio_cell(ratio):
    """Bold where ours wins; three decimals, or two significant digits below 0.01 (a diverged baseline)."""
    if ratio is None:
        return ""
    text = f"{ratio:.3f}" if ratio >= 0.01 else f"{ratio:.1e}"
    return f"**{text}**" if ratio < 1 - TIE else text


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
             "model evaluations, total | seconds, total | node's own count / seconds | fit noises' MSE, "
             "calibrated / uncalibrated | held-out calibration noises' MSE, calibrated / uncalibrated | refused |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for method in CAL_METHODS:
        for model, cfg in dict.fromkeys((c["model"], c["cfg"]) for c in calibrations):
            cs = [c for c in calibrations if c["method"] == method and c["model"] == model and c["cfg"] == cfg]
            if not cs:
                continue
            each = ", ".join((f"NFE {c['nfe']}: " if c["nfe"] is not None else "") + f"{c['evaluations']:g}"
                             for c in cs)
            stored = [c for c in cs if not c.get("refused")]  # a refused calibration leaves no report
            node = [(c["node_evaluations"], c["node_seconds"]) for c in stored if c["node_evaluations"] is not None]
            node_cell = (f"{sum(e for e, _ in node):g} / {sum(s for _, s in node):.1f}"
                         + (" (the stored ones)" if len(stored) < len(cs) else "")
                         if node and len(node) == len(stored) else "")
            lines.append(f"| {method} | {model} | {cfg:g} | {CAL_SERVES[cs[0]['serves']]} | {each} | "
                         f"{sum(c['evaluations'] for c in cs):g} | {sum(c['wall_seconds'] for c in cs):.1f} | "
                         f"{node_cell} | {ratio_range(cs, 'batch_error', 'batch_base_error')} | "
                         f"{ratio_range(cs, 'held_error', 'held_base_error')} | "
                         f"{sum(c.get('refused', False) for c in cs)} |")
    return "\n".join(lines)


def ratio_range(calibrations, error, base):
    """'min .. max' of error / base over the calibrations that report both."""
    ratios = [c[error] / c[base] for c in calibrations if c.get(error) is not None and c.get(base)]
    if not ratios:
        return ""
    return f"{min(ratios):.3f}" if len(ratios) == 1 else f"{min(ratios):.3f} .. {max(ratios):.3f}"


def calibrated_failures(rows, refused=False):
    """The runs without an error that failed (refused=False) or whose calibration was refused (refused=True)."""
    return sorted({f"{r['sampler']} ({r['model']} cfg {r['cfg']:g}, NFE {r['target_nfe']}): {r['note']}"
                   for r in rows if r.get("error") is None and not r["note"].startswith("n/a")
                   and r["note"].startswith(REFUSED) == refused})


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
          "beside; then the node's report of its fit on the noises it was fitted on (the first half) and on the "
          "held-out half that judges it (DC-Solver, IIA, DPM-Solver-v3), and how many calibrations it refused "
          "there (they cost their evaluations all the same).\n")
    print(calibration_cost_table(calibrations))
    for model, cfg in settings(rows):
        nfes = sorted({r["target_nfe"] for r in rows if r["model"] == model and r["cfg"] == cfg})
        images = 10 * len(plan[model]["seeds"])
        print(f"\n### {model}, cfg {cfg:g} ({calibrated_scheduler(model)}): mean / median per-image RMSE vs x_ref, "
              f"in data standard deviations ({images} images)\n")
        print(calibrated_error_table(rows, model, cfg, nfes))
        print(f"\nMSE ratios, {model}, cfg {cfg:g}:\n")
        print(calibrated_ratio_table(rows, model, cfg, nfes))
    refused = calibrated_failures(rows, refused=True)
    if refused:
        print("\nRefused calibrations (fitted on the first half of the calibration noises, no better than the "
              "uncalibrated base on the other half: nothing is stored, and the stride_* name samples with the "
              "base):\n\n" + "\n".join(f"- {p}" for p in refused))
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
        data = read_merged(args.tables_from)
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


