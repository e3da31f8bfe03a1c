"""Autotune: the best sampler setup for the user's model at the number of model evaluations they pay, chosen by
measurement. ComfyUI's samplers x schedulers, Stride's samplers, LD3 schedules and solvers fitted to the model
(IIA, Bespoke, DPM-Solver-v3, DC-Solver) are run on the calibration noises against one fine reference solve;
fitted ones are fitted on the first half and scored on the held-out second half, the others (fitted on nothing) on
every noise. The winner comes out as SAMPLER + SIGMAS, as text that rebuilds it on another machine, and as a report
of every candidate."""
import dataclasses
import json
import logging
import math

import torch
from PIL import Image, ImageDraw, ImageFont

import comfy.samplers
from comfy_api.latest import io

from ..samplers import bespoke
from ..samplers.schedules import ld3
from ..samplers.schedules.common import BudgetExceeded, held_out_split, in_calls_of
from . import calibrated
from . import calibration_store as store
from .calibration import autograd_weights, calibrate, conditioning_digest
from .compat import EXPERT
from .compare import PALETTE, _text, fit_steps, relative_rmse, schedule, to_image
from .sampler_bridge import SampleNotFinite, sampler_object
from .schedules import DIFFERENTIABLE, student_of

TEXT_VERSION = 1
DIVERGED = 1.0       # an image further than one reference std from the reference has diverged
REF_POINTS, REF_REFINE = 32, 2  # the reference: Stride's UniPC-3 on 32 log-SNR-spaced sigmas, each cut in 2
TOP = 2              # the fitted methods and Stride's samplers start from the best built-in schedules, this many
LD3_ITERATIONS = 60
SAMPLERS = "euler, heun, dpm_2, dpmpp_2m, uni_pc_bh2, deis, ipndm"
STRIDE = ("stride_unipc_bh2", "stride_dpmpp_3m", "stride_ghvb", "stride_ddim_dualfast", "stride_dpmpp_2m_dualfast")
METHODS = ("stride", "ld3", "iia", "bespoke", "dpm_solver_v3", "dc_solver")
LABELS = {"iia": "IIA (DPM-Solver++ 2M)", "bespoke": "Bespoke", "ld3": "LD3 schedule", "dpm_solver_v3":
          "DPM-Solver-v3", "dc_solver": "DC-Solver (UniPC)", "stride": "Stride sampler"}
UNFITTED = ("built-in", "stride")  # candidates that learn nothing from the noises: judged on all of them
OPTIONS = {"iia": {"base": "dpmpp_2m", "target": "reference"}, "dc_solver": {"solver": "unipc"},
           "dpm_solver_v3": {"statistics": "per_channel"}}


@dataclasses.dataclass
class Candidate:
    """One measured setup: a KSampler name (built-in or stride_*) or a fitted method's calibration, on sigmas."""
    label: str
    kind: str               # "built-in" | "stride" | "schedule" (LD3 sigmas, a named sampler) | "fitted"
    sampler: str            # the KSampler name, or the calibrated method
    sigmas: torch.Tensor
    calibration: dict = None
    nfe: float = math.nan   # model evaluations per image, counted
    cost: float = 0.0       # model evaluations of the calibration batch spent fitting it
    errors: torch.Tensor = None  # per held-out image
    unseen: torch.Tensor = None  # per image it was not fitted on: every noise for built-ins and Stride's samplers
    status: str = "ok"

    @property
    def error(self):
        return float(self.unseen.mean()) if self.unseen is not None else math.inf

    def row(self):
        e = self.unseen
        stats = ([float(e.mean()), float(e.median()), float(e.max())] if e is not None else [math.nan] * 3)
        return {"label": self.label, "kind": self.kind, "nfe": self.nfe, "cost": round(self.cost, 2),
                "error": stats[0], "median": stats[1], "worst": stats[2], "status": self.status}


def judge(errors):
    """'ok', or 'diverged' when an image it is judged on is not finite or further than DIVERGED from the reference."""
    return "ok" if bool(torch.isfinite(errors).all()) and float(errors.max()) <= DIVERGED else "diverged"


def significant(gain):
    """Whether per-image gains (paired, on the same held-out noises) are positive beyond noise: mean > 2 standard
    errors."""
    n = len(gain)
    return n >= 2 and bool(torch.isfinite(gain).all()) and float(gain.mean()) > 2 * float(gain.std()) / math.sqrt(n)


def select(candidates, nfe):
    """The winner among the candidates that fit the NFE and did not diverge: the best built-in (lowest mean error over
    every noise: it fits nothing), unless others beat it on the same held-out noises significantly (paired gains, see
    `significant`: with many candidates and few noises the lowest mean alone often wins by chance), then the lowest
    mean among those. When every candidate diverged, the lowest mean error anyway (logged)."""
    fits = [c for c in candidates if c.unseen is not None and c.nfe <= nfe + 1e-6]
    if not fits:
        raise ValueError(f"Stride Autotune: no candidate ran within {nfe} model evaluations; raise the NFE or list "
                         "other samplers")
    ok = [c for c in fits if c.status == "ok"]
    if not ok:
        logging.warning("Stride Autotune: every candidate diverged on a held-out noise at %d evaluations; returning "
                        "the lowest mean error anyway: raise the NFE", nfe)
        return min(fits, key=lambda c: c.error)
    builtin = min((c for c in ok if c.kind == "built-in"), key=lambda c: c.error, default=None)
    if builtin is None:
        return min(ok, key=lambda c: c.error)
    better = [c for c in ok if c is not builtin and significant(builtin.errors - c.errors)]
    return min(better, key=lambda c: c.error, default=builtin)


def as_calibration(method, fp_id, sigmas, cfg, options, values):
    """A fitted method's calibration dict exactly as its calibrate node writes it (values inline)."""
    if isinstance(values, dict):
        values = {k: torch.as_tensor(v).tolist() for k, v in values.items()}
    return json.loads(calibrated.calibration_text(method, {"id": fp_id}, sigmas, cfg, options, values))


class Tuner:
    """The search on one calibration (ctx: nodes.calibration.Calibration of every noise at sigma_max)."""

    def __init__(self, ctx, model_sampling, cfg, nfe, fp_id, iterations):
        self.ctx, self.ms, self.cfg, self.nfe, self.fp_id, self.iterations = ctx, model_sampling, cfg, nfe, fp_id, \
            iterations
        self.fit_rows, self.held_rows = held_out_split(ctx.x.shape[0], "Autotune")
        self.share = len(self.fit_rows) / ctx.x.shape[0]
        self.teacher = bespoke.Teacher(ctx.denoiser, ctx.x, ctx.sigma_max, ctx.sigma_min, ctx.param.flow, REF_POINTS,
                                       REF_REFINE)
        self.fit_ctx = dataclasses.replace(ctx, x=ctx.x[self.fit_rows], x_max=ctx.x[self.fit_rows])
        self.candidates = []

    def starts_at_max(self, sigmas):
        return abs(float(sigmas[0]) - self.ctx.sigma_max) <= 1e-4 * self.ctx.sigma_max

    def measure(self, candidate, run):
        """Run the candidate (run(x) -> sample) and score it (errors: the held-out half; unseen: the noises it was not
        fitted on), counting its evaluations per image. It runs on the whole batch: a batch conditioned row by row
        (several prompts) conditions a sub-batch as the batch's first rows, which the held-out rows are not."""
        before = self.ctx.denoiser.calls
        try:
            errors = relative_rmse(run(self.ctx.x), self.teacher.output)
        except SampleNotFinite:
            errors = torch.full((len(self.ctx.x),), math.inf)
        candidate.errors = errors[self.held_rows]
        candidate.unseen = errors if candidate.kind in UNFITTED else candidate.errors
        candidate.status = judge(candidate.unseen)
        candidate.nfe = round(self.ctx.denoiser.calls - before, 3)
        return candidate

    def named(self, name, scheduler, kind):
        """A KSampler name on a scheduler at the most steps that fit the NFE."""
        def run(steps):
            sigmas = schedule(self.ms, name, scheduler, steps)
            c = Candidate(f"{name} / {scheduler}", kind, name, sigmas)
            if not self.starts_at_max(sigmas):
                c.status = f"skipped: starts at sigma {float(sigmas[0]):.4g}, below the model's sigma_max"
                return {"steps": steps, "nfe": 0, "candidate": c}
            self.measure(c, lambda x: self.ctx.run(name, sigmas.to(x.device), x))
            return {"steps": steps, "nfe": math.ceil(c.nfe - 1e-6), "candidate": c}
        c = fit_steps(run, self.nfe)["candidate"]
        if c.nfe > self.nfe + 1e-6:
            c.status = f"cannot fit {self.nfe} evaluations (one step takes {c.nfe:g})"
        self.candidates.append(c)
        return c

    def best(self, kinds=("built-in",)):
        ok = [c for c in self.candidates if c.kind in kinds and c.status == "ok" and c.nfe <= self.nfe + 1e-6]
        return sorted(ok, key=lambda c: c.error)

    def top_schedulers(self):
        """The schedulers of the best built-in runs, best first, TOP of them."""
        out = []
        for c in self.best():
            scheduler = c.label.split(" / ")[1]
            if scheduler not in out:
                out.append(scheduler)
        return out[:TOP]

    def fitted(self, method, scheduler, sigmas=None, where=None):
        """Fit `method` on the fit noises for this scheduler (or these sigmas, described by `where`) and measure it
        on the held-out ones."""
        before = self.ctx.denoiser.calls
        if method == "ld3":
            c = self.ld3(scheduler)
        elif method == "bespoke":
            c = self.bespoke(scheduler)
        else:
            if sigmas is None:
                sigmas = comfy.samplers.calculate_sigmas(self.ms, scheduler, self.nfe)
            values, _ = calibrated.fit(method, self.fit_ctx, sigmas, OPTIONS[method], judge=False)
            cal = as_calibration(method, self.fp_id, sigmas, self.cfg, OPTIONS[method], values)
            c = Candidate(f"{LABELS[method]} / {where or scheduler}", "fitted", method, sigmas, cal)
        c.cost = self.ctx.denoiser.calls - before
        if c.calibration is not None:
            self.measure(c, lambda x: calibrated.run_calibrated(c.sampler, c.calibration, self.ctx.denoiser, x,
                                                                c.sigmas, None, None, True))
        elif c.sampler:  # a named sampler on fitted sigmas
            self.measure(c, lambda x: self.ctx.run(c.sampler, c.sigmas.to(x.device), x))
        self.candidates.append(c)

    def bespoke(self, scheduler):
        base = "rk2" if self.nfe >= 5 else "rk1"
        with torch.inference_mode(False), autograd_weights(self.ctx.inner_model.inner_model, "Bespoke"):
            sigmas = comfy.samplers.calculate_sigmas(self.ms, scheduler, bespoke.steps_for_nfe(base, self.nfe))
            sigmas = sigmas.double().clone()
            nfe = bespoke.Bespoke.identity(base, sigmas).nfe
            charge = lambda i: self.ctx.denoiser.charge(2 * nfe * self.share)  # each backward pass
            teacher = self.teacher.rows(self.fit_rows)
            for k in ("grid", "xs", "vs", "output"):  # made under inference mode: autograd needs ordinary copies
                setattr(teacher, k, getattr(teacher, k).clone())
            solver, _, _ = bespoke.fit(in_calls_of(self.ctx.denoiser, len(self.fit_rows)), teacher, sigmas,
                                       base, self.iterations, progress=charge, flow=self.ctx.param.flow)
        options = {"base": base, "iterations": self.iterations, "learning_rate": 0.03, "lipschitz": 0.0}
        cal = as_calibration("bespoke", self.fp_id, sigmas, self.cfg, options, solver.tensors())
        return Candidate(f"Bespoke {base} / {scheduler}", "fitted", "bespoke", sigmas.float(), cal)

    def ld3(self, scheduler):
        """LD3 times for the best built-in sampler with a differentiable twin, from this scheduler."""
        twins = [c for c in self.best(("built-in", "stride")) if c.label.endswith(f" / {scheduler}")
                 and (c.sampler in ("euler", "ddim", "dpmpp_2m", "uni_pc", "uni_pc_bh2")
                      or (c.sampler.startswith("stride_") and student_of(c.sampler, self.ctx.param)[0] in DIFFERENTIABLE))]
        if not twins:
            return Candidate(f"LD3 / {scheduler}", "schedule", "", torch.zeros(0),
                             status="skipped: no sampler with a differentiable twin ran well on this scheduler")
        name, init = twins[0].sampler, twins[0].sigmas.double()
        fn, options = student_of(name, self.ctx.param)
        solve = lambda model_, x_, sigmas_: fn(model_, x_, sigmas_, **options)
        with torch.inference_mode(False), autograd_weights(self.ctx.inner_model.inner_model, "LD3"):
            sigmas, _, _, _ = ld3.optimize(self.ctx.denoiser, solve, self.fit_ctx.x.clone(),
                                           self.teacher.output[self.fit_rows].clone(), init, self.ctx.sigma_min,
                                           self.ctx.param, max_iters=LD3_ITERATIONS)
        return Candidate(f"{name} on LD3 / {scheduler}", "schedule", name, sigmas.float())

    def estimate(self, method):
        """Model evaluations of the calibration batch one fit costs (rough; the budget check is exact)."""
        n, f = self.nfe, self.share
        return n + f * {"iia": 9 * n + n * (n + 1), "dc_solver": 18 * n + n * (n + 1),
                           "dpm_solver_v3": 24 + 5 * calibrated.EMS_POINTS + 8 * n + 2 * n,
                           "bespoke": 3 * n * self.iterations, "ld3": (6 * LD3_ITERATIONS + 2) * n,
                           "stride": 0}[method]

    def run(self, samplers, schedulers, methods):
        try:
            for name in samplers:
                for scheduler in schedulers:
                    self.named(name, scheduler, "built-in")
        except BudgetExceeded:
            logging.warning("Stride Autotune: the budget ran out among the built-in samplers; raise it to try them all")
        if not self.best():
            raise ValueError("Stride Autotune: every built-in sampler diverged or could not fit the NFE; raise the "
                             "NFE or the samplers listed")
        for scheduler in self.top_schedulers():
            if "stride" in methods:
                for name in STRIDE:
                    self.try_(lambda: self.named(name, scheduler, "stride"), f"{name} / {scheduler}", "stride")
            for method in methods:
                if method != "stride":
                    self.try_(lambda: self.fitted(method, scheduler), f"{LABELS[method]} / {scheduler}", method)
                last = self.candidates[-1]
                if method == "ld3" and last.status == "ok" and last.sampler == "dpmpp_2m" and "iia" in methods:
                    # times and coefficients: IIA's corrections on the learned times of DPM-Solver++ 2M
                    self.try_(lambda: self.fitted("iia", scheduler, last.sigmas, last.label), f"IIA on {last.label}",
                              "iia")
        return select(self.candidates, self.nfe)

    def try_(self, fn, label, method):
        """Run one candidate unless its estimate exceeds the budget left; a fit that fails is reported, not fatal."""
        d = self.ctx.denoiser
        left = d.budget - d.calls if d.budget is not None else math.inf
        if self.estimate(method) > left:
            self.candidates.append(Candidate(label, "fitted", method, torch.zeros(0),
                                             status=f"skipped: needs about {self.estimate(method):.0f} evaluations, "
                                                    f"{left:.0f} left in the budget"))
            return
        try:
            fn()
        except BudgetExceeded:
            self.candidates.append(Candidate(label, "fitted", method, torch.zeros(0), status="stopped: budget spent"))
        except (ValueError, RuntimeError) as e:  # ComfyUI's interruption is neither: it stops the search
            logging.warning("Stride Autotune: %s failed: %s", label, e)
            self.candidates.append(Candidate(label, "fitted", method, torch.zeros(0), status=f"failed: {e}"[:200]))


def parse_list(text, what, choices):
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in choices]
    if unknown or not names:
        raise ValueError(f"Stride Autotune: {'unknown ' + what + ' ' + ', '.join(unknown) if unknown else 'no ' + what}"
                         f"; choose from: {', '.join(choices)}")
    return list(dict.fromkeys(names))


def winner_text(winner, fp_id, cfg, nfe):
    """The winner as one line of JSON: its sampler, sigmas and fitted values (what rebuilds it anywhere)."""
    return json.dumps({"stride_autotune": TEXT_VERSION, "model": fp_id, "cfg": cfg, "nfe": nfe,
                       "label": winner.label, "kind": winner.kind, "sampler": winner.sampler,
                       "sigmas": [float(s) for s in winner.sigmas], "calibration": winner.calibration,
                       "error": winner.error})


def from_text(text):
    """(SAMPLER, SIGMAS, data) of an Autotune text."""
    data = store.parse_text(text, "stride_autotune", TEXT_VERSION, "Autotune", "Autotune", "run Autotune again")
    sigmas = torch.tensor(data["sigmas"], dtype=torch.float32)
    if data["calibration"] is not None:
        method = data["sampler"]
        sampler = sampler_object(calibrated.calibrated_sampler(method, data["calibration"]), method, {})
    else:
        if data["sampler"] not in comfy.samplers.KSampler.SAMPLERS:
            raise ValueError(f"Stride Autotune: sampler {data['sampler']!r} is not known to this ComfyUI")
        sampler = comfy.samplers.sampler_object(data["sampler"])
    return sampler, sigmas, data


def report_table(rows, winner_label, nfe, cfg, calls, seconds):
    """Markdown: every candidate, best held-out error first."""
    lines = [f"Autotune at {nfe} model evaluations per image, cfg {cfg}: errors against a fine reference solve on the "
             "calibration noises a candidate was not fitted on (all of them for built-in and Stride samplers, the "
             "held-out half for fitted ones); RMSE in units of the reference's std: mean, median and worst image.",
             f"Calibration: {calls:.0f} model evaluations of the batch in {seconds:.1f} s.", "",
             "| | candidate | kind | NFE | error | median | worst | fit cost | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    order = sorted(rows, key=lambda r: (r["status"] != "ok", r["error"] if math.isfinite(r["error"]) else math.inf))
    for r in order:
        mark = "**winner**" if r["label"] == winner_label else ""
        nums = [f"{r[k]:.4g}" if math.isfinite(r[k]) else "-" for k in ("error", "median", "worst")]
        nfe_ = f"{r['nfe']:g}" if math.isfinite(r["nfe"]) else "-"
        lines.append(f"| {mark} | {r['label']} | {r['kind']} | {nfe_} | {' | '.join(nums)} | {r['cost']:g} | "
                     f"{r['status']} |")
    return "\n".join(lines)


def plot_bars(rows, winner_label, width=640, bars=16):
    """IMAGE: the best candidates' held-out errors as bars (log scale), the winner in the first colour."""
    font = ImageFont.load_default()
    ok = sorted([r for r in rows if r["status"] == "ok"], key=lambda r: r["error"])[:bars]
    image = Image.new("RGB", (width, 60 + 18 * max(len(ok), 1)), "white")
    draw = ImageDraw.Draw(image)
    _text(draw, (10, 10), "held-out error vs reference (log scale)", font)
    if not ok:
        _text(draw, (10, 34), "no candidate ran without diverging", font)
        return to_image(image)
    lo = math.floor(math.log10(max(min(r["error"] for r in ok), 1e-12)))
    hi = max(math.ceil(math.log10(max(r["error"] for r in ok))), lo + 1)
    left, right = 260, width - 70
    for i, r in enumerate(ok):
        y = 34 + 18 * i
        w = (math.log10(max(r["error"], 1e-12)) - lo + 0.05) / (hi - lo + 0.05) * (right - left)
        colour = PALETTE[0] if r["label"] == winner_label else PALETTE[7]
        draw.rectangle((left, y, left + max(w, 1), y + 12), fill=colour)
        _text(draw, (left - 6, y + 6), r["label"][:40], font, 1.0, 0.5)
        _text(draw, (left + w + 4, y + 6), f"{r['error']:.3g}", font, 0.0, 0.5)
    return to_image(image)


def autotune(model, positive, negative, latent_image, cfg, nfe, budget, samples, seed, samplers, schedulers,
             methods, iterations):
    """(text, report, rows): from the store when this search was made before, else measured and stored."""
    samplers = parse_list(samplers, "sampler", comfy.samplers.KSampler.SAMPLERS)
    schedulers = parse_list(schedulers, "scheduler", comfy.samplers.KSampler.SCHEDULERS)
    methods = parse_list(methods, "method", METHODS) if methods.strip() else []
    if samples < 4:
        raise ValueError("Stride Autotune: use at least 4 calibration noises (half fit, half judge)")
    fp = store.fingerprint(model)
    settings = {"cfg": cfg, "nfe": nfe, "budget": budget, "samples": samples, "seed": seed, "samplers": samplers,
                "schedulers": schedulers, "methods": methods, "iterations": iterations,
                "latent": list(latent_image["samples"].shape[1:]),
                "conditioning": conditioning_digest(positive, negative)}
    found = store.find("autotune", settings, fp)
    if found is not None:
        logging.info("Stride Autotune: reused %s (no model run)", found[2])
        info = found[1]["info"]
        return info["text"], info["report"], info["rows"]
    minimum = REF_POINTS * REF_REFINE + len(samplers) * len(schedulers) * nfe
    if budget < minimum:
        raise ValueError(f"Stride Autotune: a budget of {budget} model evaluations cannot pay for the reference and "
                         f"the built-in samplers ({minimum} for {len(samplers)} samplers x {len(schedulers)} "
                         "schedulers); raise it or list fewer")
    ms = model.get_model_object("model_sampling")

    def search(ctx):
        tuner = Tuner(ctx, ms, cfg, nfe, fp["id"], iterations)
        return tuner.run(samplers, schedulers, methods), tuner.candidates
    (winner, candidates), calls, seconds = calibrate(model, positive, negative, latent_image, cfg, seed, samples,
                                                     budget, "Autotune", search)
    rows = [c.row() for c in candidates]
    text = winner_text(winner, fp["id"], cfg, nfe)
    report = report_table(rows, winner.label, nfe, cfg, calls, seconds)
    builtin = min((c.error for c in candidates if c.kind == "built-in" and c.status == "ok"), default=math.inf)
    logging.info("Stride Autotune: %s wins at %d evaluations: held-out error %.4g (best built-in %.4g)",
                 winner.label, nfe, winner.error, builtin)
    store.save("autotune", settings, fp, {"sigmas": winner.sigmas.float()},
               {"text": text, "report": report, "rows": rows, "evaluations": round(calls, 2),
                "seconds": round(seconds, 2)})
    return text, report, rows


class StrideAutotune(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StrideAutotune", display_name="Autotune sampler for my model (Stride)",
            category=calibrated.CATEGORY,
            description="Finds the sampler setup with the lowest error at the model evaluations you pay, on your "
                        "model, prompt and cfg: ComfyUI's samplers x schedulers, Stride's samplers, an LD3 schedule "
                        "and solvers fitted to your model (IIA, Bespoke, DPM-Solver-v3, DC-Solver) on the best "
                        "schedules. Fitted ones learn on half the calibration noises; every candidate is judged on "
                        "the other half against a fine reference solve, and any that diverges on one of them is "
                        "rejected, so the winner is never worse there than the best built-in tried. Stored and "
                        "reused; the text output rebuilds the winner anywhere (Autotuned sampler from text).",
            inputs=[
                io.Model.Input("model", tooltip="The model to tune for (with its LoRAs and patches)."),
                io.Conditioning.Input("positive", tooltip="Conditioning like the one you will sample with."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning like yours."),
                io.Latent.Input("latent_image", tooltip="A latent of the size you will sample at (repeated to the "
                                                        "batch of calibration noises)."),
                io.Float.Input("cfg", default=5.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="The guidance scale you will sample with (the winner is tuned for it)."),
                io.Int.Input("nfe", default=5, min=2, max=50,
                             tooltip="Model evaluations per image you will pay, counted honestly (a Heun step "
                                     "costs 2; a CFG pair counts once). Every candidate fits within it."),
                io.Int.Input("budget", default=2000, min=100, max=100000,
                             tooltip="The calibration's cap in model evaluations of the batch (the time it takes "
                                     "is about this many times one batch evaluation; the log gives the estimate). "
                                     "The reference and the built-in samplers come first; fitted candidates that "
                                     "do not fit what is left are skipped and reported."),
                io.Int.Input("samples", default=8, min=4, max=64,
                             tooltip="Calibration noises: the first half fits, the second half judges. More "
                                     "judge more reliably and cost proportionally."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=False,
                             tooltip="Seed of the calibration noises."),
                io.String.Input("samplers", default=SAMPLERS, **EXPERT,
                                tooltip="(expert) ComfyUI samplers to try, comma-separated (deterministic ones make "
                                        "sense: the winner's error is measured on fixed noises)."),
                io.String.Input("schedulers", default=", ".join(comfy.samplers.KSampler.SCHEDULERS), **EXPERT,
                                tooltip="(expert) Schedulers to try, comma-separated; the fitted methods start from "
                                        f"the best {TOP} of them."),
                io.String.Input("methods", default=", ".join(METHODS), **EXPERT,
                                tooltip="(expert) Fitted methods tried on the best schedules, in this order while "
                                        "the budget lasts: stride (Stride's uncalibrated samplers), ld3 (then IIA on "
                                        "its times), iia, bespoke, dpm_solver_v3, dc_solver. Empty: built-ins only."),
                io.Int.Input("iterations", default=150, min=0, max=5000, **EXPERT,
                             tooltip="(expert) Gradient steps of the Bespoke fit (each about 3 evaluations per "
                                     "solver step on the fit half)."),
            ],
            outputs=[io.Sampler.Output(tooltip="The winner's sampler: into SamplerCustomAdvanced with the SIGMAS."),
                     io.Sigmas.Output(tooltip="The winner's schedule."),
                     io.String.Output(display_name="report", tooltip="Every candidate's held-out error, cost and status."),
                     io.String.Output(display_name="text", tooltip="The winner as text: paste it into 'Autotuned sampler from "
                                                      "text (Stride)' to rebuild it with no model run."),
                     io.Image.Output(display_name="plot", tooltip="The best candidates' held-out errors.")])

    @classmethod
    def execute(cls, model, positive, negative, latent_image, cfg, nfe, budget, samples, seed, samplers,
                schedulers, methods, iterations) -> io.NodeOutput:
        text, report, rows = autotune(model, positive, negative, latent_image, cfg, nfe, budget, samples, seed,
                                      samplers, schedulers, methods, iterations)
        sampler, sigmas, data = from_text(text)
        return io.NodeOutput(sampler, sigmas, report, text, plot_bars(rows, data["label"]))


class StrideAutotunedSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StrideAutotunedSampler", display_name="Autotuned sampler from text (Stride)",
            category="sampling/stride/samplers",
            description="The winner of an Autotune run rebuilt from its text (sampler, schedule and fitted values): "
                        "a shared workflow samples with it without tuning again. A fitted winner refuses another "
                        "model or cfg with a clear error.",
            inputs=[io.String.Input("text", multiline=True, default="",
                                    tooltip="The text output of the Autotune node.")],
            outputs=[io.Sampler.Output(), io.Sigmas.Output()])

    @classmethod
    def execute(cls, text) -> io.NodeOutput:
        sampler, sigmas, _ = from_text(text)
        return io.NodeOutput(sampler, sigmas)


NODES = [StrideAutotune, StrideAutotunedSampler]
