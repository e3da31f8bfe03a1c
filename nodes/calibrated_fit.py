"""The fits behind the calibrate nodes (nodes/calibrated.py): DC-Solver's ratios, IIA's coefficients and
DPM-Solver-v3's statistics, each fitted on the first half of the calibration noises and judged on the other half
against its uncalibrated base (pure math in samplers/calibrated/)."""
import logging
import math

import torch

from ..samplers.calibrated import dc_solver, dpm_solver_v3, iia
from ..samplers.calibrated.memo import Memo
from ..samplers.schedules.ays import ve_denoiser
from ..samplers.schedules.common import held_out_split, in_calls_of, mse, teacher_trajectory
from .calibration import model_samples

REFINE = 8  # the reference trajectory: Stride's UniPC-3 with this many steps per step of the schedule
METHODS = {"dc_solver": "DC-Solver", "iia": "IIA", "dpm_solver_v3": "DPM-Solver-v3"}
# More calibrated methods (nodes/structural.py, nodes/bespoke.py): method -> (fit(ctx, sigmas, options),
# run(calibration, values, model, x, sigmas, extra_args, callback, disable, param, overrides), schedule_free)
EXTENSIONS = {}
EMS_POINTS = 40     # DPM-Solver-v3: lambda grid of the statistics
TEACHER_POINTS = 24  # model samples for the statistics: a UniPC-3 solve on this many points
NEUTRAL = {"dc_solver": 1.0, "iia": None}  # a step's value that leaves its base solver's update as it is


class Refused(ValueError):
    """A calibration that does no better than its uncalibrated base where it is judged: nothing is stored."""


def fit(method, ctx, sigmas, options, judge=True):
    """(values, errors) of a calibration on ctx's noises: DC-Solver's ratios, IIA's coefficients, DPM-Solver-v3's
    statistics or an extension's fit. DC-Solver and IIA with judge: fitted on the first half of the noises and
    refused, nothing stored, unless they beat their uncalibrated base on the other half; judge=False: fitted on
    every noise (Autotune, which judges on noises of its own)."""
    sigmas = sigmas.to(torch.float64)
    if method in EXTENSIONS:
        return EXTENSIONS[method][0](ctx, sigmas, options)
    with torch.no_grad():  # never differentiated (older trees create weights that require grad: no graph kept)
        return fit_ems(ctx, sigmas, options) if method == "dpm_solver_v3" else \
            fit_search(method, ctx, sigmas, options, judge)


def fit_search(method, ctx, sigmas, options, judge):
    """DC-Solver's or IIA's fit (see fit)."""
    reference = teacher_trajectory(ctx.denoiser, ctx.x, sigmas[:-1], ctx.param.flow, REFINE)[0]
    rows = held_out_split(len(ctx.x), METHODS[method]) if judge else (torch.arange(len(ctx.x)), None)
    # the fit rows are the batch's first rows: a guided model conditions them as in the whole batch
    values, errors = fit_prefix(method, Memo(ctx.denoiser), ctx, ctx.x[rows[0]], sigmas, reference[:, rows[0]],
                                options)
    if judge:
        refuse_unless_better(method, ctx, sigmas, reference[-1], values, errors, options, rows[1])
    return values, errors


def fit_prefix(method, memo, ctx, x, sigmas, reference, options):
    """The fitted values on the noises x, keeping the prefix of fitted steps (the rest neutral) whose output is
    closest to the reference there: steps are fitted one by one, and the whole run can still end worse."""
    if method == "dc_solver":
        values = dc_solver.search_ratios(memo, x, sigmas, reference, ctx.param, solver=options["solver"])
    else:
        values = iia.fit_gammas(memo, x, sigmas, ctx.sigma_min, ctx.param, options["base"],
                                reference=reference if options["target"] == "reference" else None)
    error = lambda v: float(mse(run_values(method, memo, x, sigmas, ctx.param, v, options), reference[-1]).mean())
    prefixes = [values[:k] + [NEUTRAL[method]] * (len(values) - k) for k in range(len(values) + 1)]
    scored = [(error(v), -k, v) for k, v in enumerate(prefixes)]
    best, base = min(scored, key=lambda t: t[:2]), scored[0]
    if best[2] != values:
        logging.warning("Stride %s: the fitted run is not the closest to the reference on the fit noises; "
                        "keeping the first %d steps' corrections (%s)", METHODS[method], -best[1],
                        "none: the uncalibrated base" if best[1] == 0 else f"error {best[0]:.4g} vs {base[0]:.4g}")
    return best[2], {"error": best[0], "base_error": base[0], "fitted_steps": -best[1]}


def run_values(method, model, x, sigmas, param, values, options):
    if method == "dc_solver":
        return dc_solver.sample_dc(model, x, sigmas, param=param, ratios=values, solver=options["solver"])
    return iia.sample_iia(model, x, sigmas, param=param, base=options["base"], gammas=values)


def refuse_unless_better(method, ctx, sigmas, reference, values, errors, options, held_rows):
    """Adds the held-out errors to `errors`; raises (nothing is stored) unless the fitted values beat the
    uncalibrated base there. Both run on the whole batch (each row conditioned as in it), scored on the held rows."""
    why = (f"on this schedule ({len(sigmas) - 1} steps) and cfg; refused, nothing stored. Sample with the base "
           "solver, or calibrate with more samples or another schedule")
    if errors["fitted_steps"] == 0:
        raise Refused(f"Stride {METHODS[method]}: no fitted step brings the fit noises closer to the reference "
                      f"than the uncalibrated base ({errors['base_error']:.4g}) {why}")
    held = lambda v: float(mse(run_values(method, ctx.denoiser, ctx.x, sigmas, ctx.param, v, options),
                               reference)[held_rows].mean())
    errors.update(held_out_error=held(values), held_out_base_error=held([NEUTRAL[method]] * len(values)))
    if not errors["held_out_error"] < errors["held_out_base_error"]:
        raise Refused(f"Stride {METHODS[method]}: on the held-out calibration noises the fitted run does no "
                      f"better ({errors['held_out_error']:.4g}) than the uncalibrated base "
                      f"({errors['held_out_base_error']:.4g}) {why}")


def fit_ems(ctx, sigmas, options):
    """DPM-Solver-v3's statistics from samples of the model (a UniPC-3 teacher at the user's cfg) of the first half
    of the calibration noises, on a lambda grid over the model's range (VE-ised: finite at a flow model's sigma = 1
    cap); judged on the user's schedule `sigmas` on the held-out half against plain DPM-Solver++ (the degenerate
    statistics), and refused, nothing stored, when they do no better there."""
    flow = ctx.param.flow
    fit_rows, held_rows = held_out_split(len(ctx.x), METHODS["dpm_solver_v3"])
    if options["statistics"] == "per_element":
        share = dpm_solver_v3.element_weight(len(fit_rows))
        if share < 0.5:
            logging.warning("Stride DPM-Solver-v3: per-element statistics from %d samples (the fit half) are %.0f%% "
                            "per element and "
                            "%.0f%% per channel (a few samples cannot pin down one statistic per latent element, so "
                            "they are shrunk toward the per-channel ones; half and half takes %d samples, the "
                            "paper used 1024); per_channel is the honest choice here", len(fit_rows), 100 * share,
                            100 * (1 - share), dpm_solver_v3.SHRINK)
    x0 = model_samples(ctx, TEACHER_POINTS)[fit_rows]
    to_lam = lambda s_: -math.log(s_ / (1 - s_)) if flow else -math.log(s_)
    top = min(ctx.sigma_max, ctx.param.sigma_cap) if flow else ctx.sigma_max
    lambdas = torch.linspace(to_lam(top), to_lam(ctx.sigma_min), EMS_POINTS, dtype=torch.float64)
    ems = dpm_solver_v3.estimate_ems(ve_denoiser(in_calls_of(ctx.denoiser, len(fit_rows)), flow), x0, lambdas,
                                     per_channel=options["statistics"] == "per_channel")
    reference = teacher_trajectory(ctx.denoiser, ctx.x, sigmas[:-1], flow, REFINE)[0][-1]
    run = lambda e: mse(dpm_solver_v3.sample_dpm_solver_v3(ctx.denoiser, ctx.x, sigmas, param=ctx.param, ems=e),
                        reference)
    got, base = run(ems), run(dpm_solver_v3.EMS.degenerate(lambdas, ems.l.shape[1:]))
    errors = {"error": float(got[fit_rows].mean()), "base_error": float(base[fit_rows].mean()),
              "held_out_error": float(got[held_rows].mean()), "held_out_base_error": float(base[held_rows].mean())}
    if not errors["held_out_error"] < errors["held_out_base_error"]:
        raise Refused(f"Stride DPM-Solver-v3: on the held-out calibration noises the measured statistics do no "
                      f"better ({errors['held_out_error']:.4g}) than plain DPM-Solver++ "
                      f"({errors['held_out_base_error']:.4g}) on this schedule ({len(sigmas) - 1} steps); refused, "
                      "nothing stored. Use UniPC or DPM-Solver++ for this model and cfg, or calibrate with more "
                      "samples")
    values = {"lambdas": lambdas, "l": ems.l, "s": ems.s, "b": ems.b}
    return values, errors
