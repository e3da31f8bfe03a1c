"""Calibrated solver nodes: DC-Solver, IIA and DPM-Solver-v3 measured once on the user's model (calibrate nodes),
then used by SAMPLER nodes (from a calibration or its text pasted into the workflow) and by `stride_*` KSampler
names that find a stored calibration for the model they run on."""
import json
import logging
import os

import torch

import comfy.samplers
from comfy_api.latest import io

from ..samplers import multistep
from ..samplers.calibrated import dc_solver, dpm_solver_v3, iia
from ..samplers.core import check_sigmas
from . import calibration_store as store
from .calibrated_fit import EMS_POINTS, EXTENSIONS, METHODS, REFINE, TEACHER_POINTS, Refused, fit
from .calibration import calibrate, conditioning_digest
from .sampler_bridge import model_param, sampler_object

CATEGORY = "sampling/stride/calibration"
TEXT_VERSION = 1
INLINE_VALUES = 20000  # calibrations with at most this many numbers also travel in the workflow text


def calibration_text(method, fp, sigmas, cfg, options, values):
    """The calibration as one line of JSON, small enough for a workflow widget."""
    return json.dumps({"stride_calibration": TEXT_VERSION, "method": method, "model": fp["id"], "cfg": cfg,
                       "sigmas": [float(s) for s in sigmas], "options": options, "values": values})


def parse_calibration(text, method):
    """The calibration dict of a calibration text, checked for its method and format."""
    data = store.parse_text(text, "stride_calibration", TEXT_VERSION, METHODS[method], "calibration")
    if data.get("method") != method:
        raise ValueError(f"Stride {METHODS[method]}: this is a {data.get('method')} calibration, not {method}")
    return data


def match(calibration, sigmas, method, model_sampling):
    """None if the calibration fits this schedule, else why not (DPM-Solver-v3's statistics fit any schedule
    inside their lambda range, which its sampler checks; a CPR fit, its scheduler at any step count)."""
    if method == "dpm_solver_v3" or (method in EXTENSIONS and EXTENSIONS[method][2]):
        return None
    scheduler = calibration["options"].get("cpr")
    if scheduler:
        want = comfy.samplers.calculate_sigmas(model_sampling, scheduler, len(sigmas) - 1).double()
        if torch.allclose(want, torch.as_tensor(sigmas, dtype=torch.float64).cpu(), rtol=1e-4, atol=1e-6):
            return None
        return f"its CPR fit is for the {scheduler} scheduler (full denoise)"
    want = torch.tensor(calibration["sigmas"], dtype=torch.float64)
    got = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
    if len(want) != len(got):
        return f"it was made for {len(want) - 1} steps, this run has {len(got) - 1}"
    if not torch.allclose(want, got, rtol=1e-4, atol=1e-6):
        return "it was made for another schedule (scheduler, denoise or model sampling differ)"
    return None


def calibrated_sampler(method, calibration, options=None):
    """The k-diffusion sampler function of a calibration: checks the model and the schedule at run time, and
    refuses another model with a clear error. options: sampling options (DPM-Solver-v3's order, corrector)."""
    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        fp = store.fingerprint(model.inner_model.model_patcher)
        if calibration["model"] != fp["id"]:
            raise ValueError(f"Stride {METHODS[method]}: this calibration was made for another model "
                             f"({calibration['model']}, this one is {fp['id']}); calibrate this model instead")
        why = match(calibration, sigmas, method, model_sampling_of(model))
        cfg = float(getattr(model.inner_model, "cfg", 1.0))
        if why is None and calibration["cfg"] is not None and abs(calibration["cfg"] - cfg) > 1e-6:
            why = f"it was made at cfg {calibration['cfg']}, this run uses {cfg}"
        if why:
            raise ValueError(f"Stride {METHODS[method]}: the calibration does not fit this run: {why}")
        return run_calibrated(method, calibration, model, x, sigmas, extra_args, callback, disable, options)
    return sample


def model_sampling_of(model):
    return model.inner_model.model_patcher.get_model_object("model_sampling")


def stored_values(calibration, method):
    """A calibration's tensors: from its text when they were small enough, else from the calibration store."""
    values = calibration["values"]
    if values is None:
        name = calibration["options"]["file"]
        path = next((p for p in store.paths(method) if p.endswith(name)), None)
        if path is None:
            raise ValueError(f"Stride {METHODS[method]}: this calibration is too large for the workflow text and lives "
                             f"in the calibration store ({name}), which is not on this machine: copy the file into "
                             "models/stride_calibrations, or calibrate here")
        values = store.read(path)[0]
    return {k: torch.as_tensor(v, dtype=torch.float64) for k, v in values.items()}


def ems_of(calibration):
    """DPM-Solver-v3's statistics (per channel: from the text; per element: from the store)."""
    t = stored_values(calibration, "dpm_solver_v3")
    return dpm_solver_v3.EMS(t["lambdas"], t["l"], t["s"], t["b"])


def run_calibrated(method, calibration, model, x, sigmas, extra_args, callback, disable, overrides=None):
    options, param = calibration["options"], model_param(model)
    if method in EXTENSIONS:
        return EXTENSIONS[method][1](calibration, stored_values(calibration, method), model, x, sigmas, extra_args,
                                     callback, disable, param, overrides or {})
    if method == "dpm_solver_v3":
        overrides = overrides or {}
        return dpm_solver_v3.sample_dpm_solver_v3(model, x, sigmas, extra_args, callback, disable, param,
                                                  ems=ems_of(calibration), order=overrides.get("order", 2),
                                                  corrector=overrides.get("corrector", "on"))
    if method == "dc_solver":
        ratios = calibration["values"]
        if options.get("cpr"):  # ratios predicted for this run's NFE and cfg
            cfg = float(getattr(model.inner_model, "cfg", 1.0))
            ratios = dc_solver.cpr_ratios(torch.tensor(ratios, dtype=torch.float64), len(sigmas) - 1, cfg)
            outside = [f"{what} {value:g} outside the searched {lo:g}-{hi:g}" for what, value, (lo, hi) in
                       (("steps", len(sigmas) - 1, options.get("steps", (0, 1e9))),
                        ("cfg", cfg, options.get("cfgs", (-1e9, 1e9)))) if not lo <= value <= hi]
            if outside:
                logging.warning("Stride DC-Solver: the CPR ratios are extrapolated (%s); they are least reliable "
                                "there: add these settings to the CPR calibration", ", ".join(outside))
            logging.info("Stride DC-Solver: CPR ratios for %d steps at cfg %g: %s", len(sigmas) - 1, cfg,
                         [round(r, 3) for r in ratios])
        return dc_solver.sample_dc(model, x, sigmas, extra_args, callback, disable, param, ratios=ratios,
                                   solver=options["solver"])
    return iia.sample_iia(model, x, sigmas, extra_args, callback, disable, param, base=options["base"],
                          gammas=calibration["values"])


def find_stored(method, model_patcher, sigmas, cfg):
    """(calibration dict, None) of the newest stored calibration for this model, schedule and cfg, or
    (None, why not)."""
    fp = store.fingerprint(model_patcher)
    reasons = []
    for path in sorted(store.paths(method), key=os.path.getmtime, reverse=True):  # the newest first
        try:
            _, meta = store.read(path, tensors=False)
        except Exception as e:  # damaged files are reported, never fatal
            reasons.append(f"{path} unreadable ({e})")
            continue
        calibration = meta.get("info", {}).get("calibration")
        if meta.get("version") != store.VERSION or not calibration:
            continue
        if store.mismatch(meta.get("fingerprint", {}), fp):
            continue
        why = match(calibration, sigmas, method, model_patcher.get_model_object("model_sampling"))
        if why is None and calibration["cfg"] is not None and abs(calibration["cfg"] - cfg) > 1e-6:
            why = f"it was made at cfg {calibration['cfg']}, this run uses {cfg}"
        if why is None:
            return calibration, None
        reasons.append(why)
    return None, "; ".join(reasons) or "none is stored for this model"


# The uncalibrated base each calibrated KSampler name falls back to: (function, options)
BASES = {"dc_solver": (multistep.sample_unipc, {"order": 2, "variant": "bh2"}),
         "iia": (multistep.sample_dpmpp, {"order": 2}),
         "dpm_solver_v3": (multistep.sample_unipc, {"order": 2, "variant": "bh2"})}


def ksampler_function(method):
    """The function behind a `stride_*` calibrated KSampler name: a stored calibration for the model and
    schedule of this run if there is one (logged), otherwise the uncalibrated base solver (logged, with why)."""
    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        check_sigmas(sigmas, METHODS[method])
        guider = model.inner_model
        cfg = float(getattr(guider, "cfg", 1.0))
        calibration, why = find_stored(method, guider.model_patcher, sigmas, cfg)
        if calibration is None:
            logging.warning("Stride %s: no calibration fits this run (%s); sampling with the uncalibrated base "
                            "solver. Run the 'Calibrate %s (Stride)' node for this model, schedule and cfg.",
                            METHODS[method], why, METHODS[method])
            fn, options = BASES[method]
            return fn(model, x, sigmas, extra_args, callback, disable, param=model_param(model), **options)
        logging.info("Stride %s: using the stored calibration for model %s (this run: %d steps, cfg %g)",
                     METHODS[method], calibration["model"], len(sigmas) - 1, cfg)
        return run_calibrated(method, calibration, model, x, sigmas, extra_args, callback, disable)
    return sample


# `stride_*` KSampler names that use a stored calibration for the model they run on (never rename one)
KSAMPLERS = {"stride_dc_solver": (ksampler_function("dc_solver"), {}),
             "stride_iia_dpmpp_2m": (ksampler_function("iia"), {}),
             "stride_dpm_solver_v3": (ksampler_function("dpm_solver_v3"), {})}


def _calibrate_inputs(extra):
    return [
        io.Model.Input("model", tooltip="The model to calibrate (with its LoRAs and patches)."),
        io.Conditioning.Input("positive", tooltip="Conditioning of the calibration (prompts like yours)."),
        io.Conditioning.Input("negative", tooltip="Negative conditioning of the calibration."),
        io.Latent.Input("latent_image", tooltip="A latent of the size you will sample at; repeated to the batch. For "
                                                "img2img (a schedule starting below the model's sigma_max), the "
                                                "image latent you will start from: it is noised to that sigma."),
        io.Float.Input("cfg", default=5.0, min=0.0, max=100.0, step=0.1, round=0.01,
                       tooltip="The guidance scale you will sample with (a calibration holds for one scale)."),
        io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="karras",
                       tooltip="The scheduler you will sample with (ignored when `sigmas` is connected)."),
        io.Int.Input("steps", default=6, min=3, max=100, tooltip="The number of steps you will sample with."),
        io.Int.Input("samples", default=4, min=2, max=64,
                     tooltip="Calibration noises (the batch): the first half fits, the other half judges the fit."),
        io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=False,
                     tooltip="Seed of the calibration noises."),
    ] + extra + [io.Sigmas.Input("sigmas", optional=True,
                                 tooltip="Optional: calibrate for this schedule (e.g. an optimized one, or a split "
                                         "schedule's tail) instead. A schedule starting below the model's sigma_max "
                                         "is calibrated from its own start: an empty latent's noises are first "
                                         "carried down to it by the reference solver.")]


def _calibrate(method, model, positive, negative, latent_image, cfg, scheduler, steps, samples, seed, sigmas,
               options, cost_per_step):
    """Run one calibration (or reuse the stored one) and return its text. scheduler, steps and sigmas all None: a
    schedule-free calibration (teleportation's statistics), made and stored for the model's whole range."""
    ms = model.get_model_object("model_sampling")
    schedule_free = method == "dpm_solver_v3" or (method in EXTENSIONS and EXTENSIONS[method][2])
    if sigmas is None and scheduler is None and schedule_free:
        sigmas = torch.tensor([float(ms.sigma_max), 0.0])
    elif sigmas is None:
        sigmas = comfy.samplers.calculate_sigmas(ms, scheduler, steps)
    check_sigmas(sigmas, METHODS[method])
    if (len(sigmas) < 4 and scheduler is not None) or float(sigmas[-1]) != 0.0:
        raise ValueError(f"Stride {METHODS[method]}: calibrate a schedule of at least 3 steps ending in 0")
    fp = store.fingerprint(model)
    settings = {"cfg": cfg, "sigmas": [round(float(s), 6) for s in sigmas], "samples": samples, "seed": seed,
                "latent": list(latent_image["samples"].shape[1:]), "options": options,
                "conditioning": conditioning_digest(positive, negative)}
    found = store.find(method, settings, fp)
    if found is not None:
        logging.info("Stride %s: reused %s (no model run)", METHODS[method], found[2])
        return found[1]["info"]["text"]
    estimate = 1 + cost_per_step * (1 if schedule_free else len(sigmas) - 1)
    (values, errors), calls, seconds = calibrate(model, positive, negative, latent_image, cfg, seed, samples,
                                                 estimate, METHODS[method], lambda ctx: fit(method, ctx, sigmas, options),
                                                 capped=False, start=float(sigmas[0]))
    tensors = {"sigmas": sigmas.float()}
    if isinstance(values, dict):  # tensors: in the store, and in the text when small (not per-element statistics)
        tensors.update(values)
        inline = options.get("statistics") != "per_element" and sum(v.numel() for v in values.values()) <= INLINE_VALUES
        options = options if inline else {**options, "file": store.file_name(method, settings, fp)}
        values = {k: v.tolist() for k, v in values.items()} if inline else None
    text = calibration_text(method, fp, sigmas, cfg, options, values)
    info = {**errors, "evaluations": round(calls, 2), "seconds": round(seconds, 2),
            "calibration": json.loads(text), "text": text}
    store.save(method, settings, fp, tensors, info)
    measured = (f"; error against the reference {errors['error']:.4g} (uncalibrated {errors['base_error']:.4g})"
                if "error" in errors else "")
    if "held_out_error" in errors:
        measured += (f" on the fit noises, {errors['held_out_error']:.4g} (uncalibrated "
                     f"{errors['held_out_base_error']:.4g}) on the held-out noises")
    logging.info("Stride %s: %d model evaluations, %.1f s%s", METHODS[method], calls, seconds, measured)
    return text


class StrideCalibrateDCSolver(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StrideCalibrateDCSolver", display_name="Calibrate DC-Solver (Stride)", category=CATEGORY,
            description="DC-Solver's compensation ratios searched on your model: a reference trajectory from the "
                        "calibration noises, then per step the ratio whose compensated step lands closest to it "
                        "(golden-section search; about 10 model evaluations per step). Stored, and written as "
                        "text for the DC-Solver sampler's widget.",
            inputs=_calibrate_inputs([io.Combo.Input(
                "solver", options=["unipc", "dpmpp"], default="unipc",
                tooltip="UniPC (bh2, order 2, with corrector: the paper's) or DPM-Solver++ 2M (predictor only).")]),
            outputs=[io.String.Output(tooltip="The calibration: paste it into the DC-Solver sampler node.")])

    @classmethod
    def execute(cls, model, positive, negative, latent_image, cfg, scheduler, steps, samples, seed, solver,
                sigmas=None) -> io.NodeOutput:
        return io.NodeOutput(_calibrate("dc_solver", model, positive, negative, latent_image, cfg, scheduler, steps,
                                        samples, seed, sigmas, {"solver": solver}, REFINE + 12))


def parse_floats(text, what, label="DC-Solver CPR"):
    """The numbers of a comma- (or semicolon-) separated widget text, with a clear error naming the input."""
    try:
        values = [float(v) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"Stride {label}: {what} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise ValueError(f"Stride {label}: list at least one value in {what}")
    return values


class StrideCalibrateDCSolverCPR(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StrideCalibrateDCSolverCPR", display_name="Calibrate DC-Solver for any steps and cfg (Stride)",
            category=CATEGORY,
            description="DC-Solver's cascade polynomial regression: the ratios searched at several step counts and "
                        "guidance scales (each a DC-Solver calibration, stored), then the paper's 36-coefficient "
                        "polynomial in step position, steps and cfg fitted to them, so the sampler and "
                        "stride_dc_solver predict ratios for other steps and cfg of this scheduler with no search.",
            inputs=[i for i in _calibrate_inputs([]) if i.id not in ("cfg", "steps", "sigmas")] + [
                io.String.Input("steps_list", default="5, 6, 8, 10",
                                tooltip="Step counts to search (at least 3 each). Runs at other step counts or cfg "
                                        "use the polynomial's extrapolation, with a warning."),
                io.String.Input("cfg_list", default="1, 3, 5.5", tooltip="Guidance scales to search."),
                io.Combo.Input("solver", options=["unipc", "dpmpp"], default="unipc",
                               tooltip="UniPC (bh2, order 2, with corrector) or DPM-Solver++ 2M (predictor only).")],
            outputs=[io.String.Output(tooltip="The CPR calibration: paste it into the DC-Solver sampler node.")])

    @classmethod
    def execute(cls, model, positive, negative, latent_image, scheduler, samples, seed, steps_list, cfg_list,
                solver) -> io.NodeOutput:
        searched = {}
        step_counts = parse_floats(steps_list, "steps_list")
        if any(s_ != int(s_) or s_ < 3 for s_ in step_counts):
            raise ValueError(f"Stride DC-Solver CPR: steps_list must be whole numbers of at least 3 steps (fewer have "
                             f"nothing to compensate), got {steps_list!r}")
        cfgs = parse_floats(cfg_list, "cfg_list")
        for steps in sorted({int(s_) for s_ in step_counts}):
            for cfg in cfgs:
                try:
                    text = _calibrate("dc_solver", model, positive, negative, latent_image, cfg, scheduler, steps,
                                      samples, seed, None, {"solver": solver}, REFINE + 12)
                except Refused as e:  # the base's ratios are this setting's best measured ones
                    logging.warning("%s; for the CPR fit, %d steps at cfg %g count as the uncalibrated base "
                                    "(ratios 1)", e, steps, cfg)
                    searched[(steps, cfg)] = [1.0] * steps
                    continue
                searched[(steps, cfg)] = json.loads(text)["values"]
        coeffs = dc_solver.cpr_fit(searched)
        fp = store.fingerprint(model)
        searched_range = {"steps": [min(k[0] for k in searched), max(k[0] for k in searched)],
                          "cfgs": [min(cfgs), max(cfgs)]}
        text = calibration_text("dc_solver", fp, [], None, {"solver": solver, "cpr": scheduler, **searched_range},
                                coeffs.tolist())
        settings = {"cpr": sorted(f"{k[0]}@{k[1]}" for k in searched), "scheduler": scheduler, "samples": samples,
                    "seed": seed, "solver": solver, "conditioning": conditioning_digest(positive, negative)}
        store.save("dc_solver", settings, fp, {"coefficients": coeffs.float()},
                   {"calibration": json.loads(text), "text": text, "searched": len(searched)})
        return io.NodeOutput(text)


class StrideCalibrateIIA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StrideCalibrateIIA", display_name="Calibrate IIA (Stride)", category=CATEGORY,
            description="IIA's per-step coefficients fitted on your model by least squares, step by step along "
                        "the corrected run, against the reference trajectory (or the paper's local fine-step "
                        "target). Stored, and written as text for the IIA sampler's widget.",
            inputs=_calibrate_inputs([
                io.Combo.Input("base", options=list(iia.BASES), default="dpmpp_2m",
                               tooltip="The solver IIA corrects: DDIM (= Euler), DPM-Solver++ 2M, or Heun (2 calls "
                                       "per step)."),
                io.Combo.Input("target", options=["reference", "fine"], default="reference",
                               tooltip="(expert) What each step is fitted to. reference (Stride's default, not the "
                                       "paper's): the reference trajectory at the step's end, so the corrections "
                                       "steer the run back onto it. fine (the paper's local target): the base solver "
                                       "on 8 finer steps from the step's start (8 more model evaluations per step; on "
                                       "the demo models it often raised the final error).")]),
            outputs=[io.String.Output(tooltip="The calibration: paste it into the IIA sampler node.")])

    @classmethod
    def execute(cls, model, positive, negative, latent_image, cfg, scheduler, steps, samples, seed, base, target,
                sigmas=None) -> io.NodeOutput:
        return io.NodeOutput(_calibrate("iia", model, positive, negative, latent_image, cfg, scheduler, steps,
                                        samples, seed, sigmas, {"base": base, "target": target},
                                        REFINE + (18 if target == "fine" else 2)))


class StrideCalibrateDPMSolverV3(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StrideCalibrateDPMSolverV3", display_name="Calibrate DPM-Solver-v3 (Stride)", category=CATEGORY,
            description="DPM-Solver-v3's empirical model statistics (l, s, b on 40 half-log-SNR points) measured on "
                        "samples of your model at your cfg (from the first half of the calibration noises): l by "
                        "finite-difference Jacobian probes, s and b by regression along the ODE. About 100-200 model "
                        "evaluations of the batch. The statistics serve any schedule in their range; they are judged "
                        "on your scheduler and steps (or `sigmas`) on the other half of the noises, and refused, "
                        "nothing stored, when plain DPM-Solver++ does as well there. "
                        "Per channel (default): resolution-independent and small enough to travel in the workflow "
                        "text. Per element: statistics for this latent size only, kept in the calibration store.",
            inputs=_calibrate_inputs([io.Combo.Input(
                "statistics", options=["per_channel", "per_element"], default="per_channel",
                tooltip="Share the statistics over spatial positions (per channel) or keep one per latent element "
                        "(shrunk toward the per-channel ones by samples / (samples + 256): a few samples cannot pin "
                        "them down; at 64 samples they are 20% per element, and the node warns below half).")]),
            outputs=[io.String.Output(tooltip="The calibration: paste it into the DPM-Solver-v3 sampler node.")])

    @classmethod
    def execute(cls, model, positive, negative, latent_image, cfg, scheduler, steps, samples, seed, statistics,
                sigmas=None) -> io.NodeOutput:
        return io.NodeOutput(_calibrate("dpm_solver_v3", model, positive, negative, latent_image, cfg, scheduler,
                                        steps, samples, seed, sigmas, {"statistics": statistics},
                                        TEACHER_POINTS + 5 * EMS_POINTS * (samples + 1) // (2 * samples)
                                        + REFINE * steps))


V3_INPUTS = [io.Int.Input("order", default=2, min=1, max=3, tooltip="Predictor order: 2 with guidance (the paper's "
                                                                   "choice), 3 without."),
             io.Combo.Input("corrector", options=["on", "off", "high_noise"], default="on",
                            tooltip="The pseudo-corrector (no extra model call): on, off, or only where the noise "
                                    "exceeds the signal (the official code's setting for large guidance).")]


def _sampler_node(node_id, method, display, description, extra=()):
    class Node(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(
                node_id=node_id, display_name=display, category="sampling/stride/samplers", description=description,
                inputs=[io.String.Input("calibration", multiline=True, default="",
                                        tooltip="The text of the calibrate node (connect it, or paste it: a shared "
                                                "workflow then needs no recalibration).")] + list(extra),
                outputs=[io.Sampler.Output()])

        @classmethod
        def execute(cls, calibration, **options) -> io.NodeOutput:
            data = parse_calibration(calibration, method)
            return io.NodeOutput(sampler_object(calibrated_sampler(method, data, options), method, {}))
    Node.__name__ = node_id
    return Node


StrideSamplerDCSolver = _sampler_node(
    "StrideSamplerDCSolver", "dc_solver", "DC-Solver sampler (Stride)",
    "UniPC (or DPM-Solver++ 2M) with DC-Solver's dynamic compensation, from a calibration of this model, schedule "
    "and cfg. Refuses, with a clear error, a calibration of another model or schedule.")
StrideSamplerIIA = _sampler_node(
    "StrideSamplerIIA", "iia", "IIA sampler (Stride)",
    "DDIM, DPM-Solver++ 2M or Heun with IIA's fitted per-step corrections, from a calibration of this model, "
    "schedule and cfg. Refuses, with a clear error, a calibration of another model or schedule.")

StrideSamplerDPMSolverV3 = _sampler_node(
    "StrideSamplerDPMSolverV3", "dpm_solver_v3", "DPM-Solver-v3 sampler (Stride)",
    "DPM-Solver-v3 multistep with the pseudo-corrector, from your model's statistics (any schedule inside their "
    "range, any step count). Refuses, with a clear error, statistics of another model.", V3_INPUTS)

NODES = [StrideCalibrateDCSolver, StrideCalibrateDCSolverCPR, StrideCalibrateIIA, StrideCalibrateDPMSolverV3, StrideSamplerDCSolver,
         StrideSamplerIIA, StrideSamplerDPMSolverV3]
