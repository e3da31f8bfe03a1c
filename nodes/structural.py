"""Structural accelerators: ParaDiGMS (model evaluations batched across steps) and Bottleneck Sampling (the
middle steps at a lower resolution) as SAMPLER nodes; analytical teleportation and ReDi retrieval as calibrated
methods (a calibrate node, then a sampler node or text) on the machinery of nodes/calibrated.py."""
import functools
import logging

from comfy_api.latest import io

from ..samplers import bottleneck, parallel, redi, teleport
from ..samplers.core import VE
from ..samplers.multistep import sample_ddim
from . import calibrated
from .calibrated import _calibrate, _calibrate_inputs, _sampler_node, parse_floats
from .cache import family_name
from .calibration import model_samples
from .sampler_bridge import sampler_object

CATEGORY = "sampling/stride/samplers"


def _no_mask(extra_args, name):
    if (extra_args or {}).get("denoise_mask") is not None:
        raise ValueError(f"Stride {name}: inpainting masks (noise_mask) are not supported; sample without a mask")


def sample_paradigms_logged(model, x, sigmas, extra_args=None, callback=None, disable=None, param=VE, window=8,
                            tolerance=0.1, order=2):
    """ParaDiGMS with its trade reported: sequential rounds (wall time, given idle batch capacity) against
    total model evaluations."""
    _no_mask(extra_args, "ParaDiGMS")
    stats = {}
    out = parallel.sample_paradigms(model, x, sigmas, extra_args, callback, disable, param, window, tolerance, stats,
                                    order)
    if stats.get("steps"):
        logging.info("Stride ParaDiGMS: %d steps in %d sequential rounds (x%.2f fewer) with %d model evaluations per "
                     "image (x%.2f more); window %d, tolerance %g. Wall time falls only when the device has idle "
                     "batch capacity.", stats["steps"], stats["rounds"], stats["steps"] / stats["rounds"],
                     stats["evaluations"], stats["evaluations"] / stats["steps"], window, tolerance)
    return out


class StrideSamplerParaDiGMS(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StrideSamplerParaDiGMS", display_name="ParaDiGMS parallel sampler (Stride)", category=CATEGORY,
            description="ParaDiGMS (Shih et al. 2023): Picard iterations over a sliding window of DDIM or "
                        "DPM-Solver++ 2M steps, the model evaluated on the whole window in one batch. Fewer sequential model calls, more model "
                        "evaluations in all: faster only when the GPU has idle batch capacity (small images, "
                        "batch 1). Each run logs its rounds and evaluations.",
            inputs=[io.Int.Input("window", default=8, min=1, max=64,
                                 tooltip="Steps evaluated together in one batch (1: plain sequential DDIM)."),
                    io.Float.Input("tolerance", default=0.1, min=1e-6, max=10.0, step=0.01,
                                   tooltip="How far a step may still move, relative to its sigma step, for the "
                                           "window to slide past it. Smaller: closer to the sequential sampler, "
                                           "more rounds."),
                    io.Int.Input("order", default=2, min=1, max=2,
                                 tooltip="The solver whose steps are iterated: 1 = DDIM, 2 = DPM-Solver++ 2M.")],
            outputs=[io.Sampler.Output()])

    @classmethod
    def execute(cls, window, tolerance, order=2) -> io.NodeOutput:
        return io.NodeOutput(sampler_object(sample_paradigms_logged, "paradigms",
                                            {"window": window, "tolerance": tolerance, "order": order}))


def sample_bottleneck_logged(model, x, sigmas, extra_args=None, callback=None, disable=None, param=VE,
                             low_scale=0.5, fractions=(0.2, 0.55, 0.25), strengths=(1.0, 0.8, 0.6),
                             shifts=(1.0, 1.0, 1.0), noise_sampler=None):
    """Bottleneck Sampling high -> low -> high with DDIM in each stage; logs the stages and the compute fraction."""
    _no_mask(extra_args, "Bottleneck")
    stats = {}
    if x.ndim != 4:  # the refusal names the family (a video or packed latent)
        base = model.inner_model.model_patcher.model
        raise ValueError(f"Stride bottleneck: {family_name(base)} samples latents of shape {tuple(x.shape)} (video "
                         "frames, or audio+video packed flat), and Bottleneck Sampling resizes image latents [batch, "
                         "channels, height, width] only; use another Stride sampler for this model")
    out = bottleneck.sample_bottleneck(model, x, sigmas, extra_args, callback, disable, param,
                                       scales=(1.0, low_scale, 1.0), fractions=fractions, strengths=strengths,
                                       shifts=shifts, noise_sampler=noise_sampler, stats=stats)
    if stats:
        logging.info("Stride Bottleneck: stages of %s steps at %s; %.0f%% of the full-resolution compute (by "
                     "latent area)", stats.get("steps"), stats.get("sizes"), 100 * stats.get("pixel_steps", 1.0))
    return out


def _floats(text, n, what):
    values = parse_floats(text, what, "Bottleneck")
    if len(values) != n:
        raise ValueError(f"Stride Bottleneck: {what} needs {n} comma-separated numbers (one per stage), got {text!r}")
    return tuple(values)


class StrideSamplerBottleneck(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StrideSamplerBottleneck", display_name="Bottleneck sampler (Stride)", category=CATEGORY,
            description="Bottleneck Sampling (Tian et al. 2025): the first steps at full resolution (layout), the "
                        "middle ones on a smaller latent (cheap), the last ones at full resolution again (detail). "
                        "Between stages the clean estimate is resized (area averaging down, bicubic up) and "
                        "re-noised with the model's own interpolant. Works on EPS and flow models whose network "
                        "accepts the smaller size (DiTs; UNets need sizes their down-sampling divides).",
            inputs=[io.Float.Input("low_scale", default=0.5, min=0.125, max=1.0, step=0.125,
                                   tooltip="Latent scale of the middle stage (0.5: half width and height)."),
                    io.String.Input("fractions", default="0.2, 0.55, 0.25",
                                    tooltip="Share of the steps of each stage (high, low, high)."),
                    io.String.Input("strengths", default="1.0, 0.8, 0.6",
                                    tooltip="Noise re-introduced at each stage's start, as a fraction of the "
                                            "starting noise level (the first must be 1)."),
                    io.String.Input("shifts", default="1.0, 1.0, 1.0",
                                    tooltip="(expert) SD3/Flux time shift per stage; above 1 moves a stage's steps "
                                            "to higher noise (the paper's Flux setting: 9, 6, 9).")],
            outputs=[io.Sampler.Output()])

    @classmethod
    def execute(cls, low_scale, fractions, strengths, shifts) -> io.NodeOutput:
        options = {"low_scale": low_scale, "fractions": _floats(fractions, 3, "fractions"),
                   "strengths": _floats(strengths, 3, "strengths"), "shifts": _floats(shifts, 3, "shifts")}
        bottleneck.check_options(3, (1.0, low_scale, 1.0), options["fractions"], options["strengths"],
                                 options["shifts"])
        return io.NodeOutput(sampler_object(sample_bottleneck_logged, "bottleneck", options))


# --- teleportation and ReDi as calibrated methods ---------------------------------------------------------------

TELEPORT_POINTS = 24  # the teacher solve that produces the model samples


def fit_teleport(ctx, sigmas, options):
    """Gaussian statistics of samples of the model (a UniPC-3 teacher at the user's cfg and conditioning), for the
    model's whole noise range: no schedule enters them."""
    samples = model_samples(ctx, TELEPORT_POINTS)
    if options["rank"] > len(samples) - 1:
        logging.warning("Stride teleportation: rank %d needs at least %d samples; %d samples give only %d principal "
                        "directions (the rest is isotropic): raise samples for the rank you asked for",
                        options["rank"], options["rank"] + 1, len(samples), len(samples) - 1)
    mu, u, lam, lam_res = teleport.gaussian_stats(samples, options["rank"])
    return {"mu": mu, "u": u, "lam": lam, "lam_res": lam_res.reshape(1)}, {"rank": int(u.shape[1])}


def run_teleport(calibration, values, model, x, sigmas, extra_args, callback, disable, param, overrides):
    if calibration["cfg"] is not None and calibration["cfg"] != 1.0:
        logging.warning("Stride teleportation: the Gaussian follows the distribution of your samples, while "
                        "classifier-free guidance (cfg %g) bends the early trajectory away from it (at high noise it "
                        "extrapolates past the conditional mean); keep skip small and compare with plain sampling",
                        calibration["cfg"])
    stats = (values["mu"], values["u"], values["lam"], values["lam_res"][0])
    skip = overrides.get("skip", 0.2)
    k = teleport.skip_index(sigmas, skip)
    logging.info("Stride teleportation: the first %d of %d steps jumped in closed form (no model evaluation)", k,
                 len(sigmas) - 1)
    return teleport.sample_teleport(model, x, sigmas, extra_args, callback, disable, param, stats, skip)


REDI_EXPLAINED = 0.5  # below this share of a state explained by the nearest keys, retrieval is mostly a guess


def fit_redi(ctx, sigmas, options):
    """The knowledge base: DDIM runs of the calibration batch, keys at key_step, values at value_step."""
    solve = lambda x, s: sample_ddim(ctx.denoiser, x, s, param=ctx.param)
    keys, values = redi.build(solve, ctx.x, sigmas.double(), options["key_step"], options["value_step"])
    share = redi.self_explained(keys)
    if share < REDI_EXPLAINED:
        logging.warning("Stride ReDi: the %d stored trajectories explain only %.0f%% of each other's state at the key "
                        "step (latents of %d values): too few for retrieval to stand in for the skipped steps; build "
                        "the knowledge base from more samples", len(keys), 100 * share, keys.shape[1])
    return {"keys": keys, "values": values}, {"entries": len(keys), "explained": round(share, 4)}


def run_redi(calibration, values, model, x, sigmas, extra_args, callback, disable, param, overrides):
    options = calibration["options"]
    k, v = options["key_step"], options["value_step"]
    carry = overrides.get("residual", "carry") == "carry"
    logging.info("Stride ReDi: steps %d to %d retrieved from %d stored trajectories (no model evaluation)%s", k, v,
                 len(values["keys"]), "; the unexplained part carried forward" if carry else "")
    stats = {}
    out = redi.sample_redi(model, x, sigmas, extra_args, callback, disable,
                           knowledge=(values["keys"], values["values"]), key_step=k, value_step=v,
                           neighbours=overrides.get("neighbours", 8),
                           residual_scale=float(sigmas[v] / sigmas[k]) if carry else 0.0, stats=stats,
                           solver=functools.partial(sample_ddim, param=param))
    share = sum(stats["explained"]) / len(stats["explained"])
    if share < REDI_EXPLAINED:
        logging.warning("Stride ReDi: the knowledge base explains only %.0f%% of this run's state at step %d: the "
                        "retrieved state is mostly a guess; build it from more samples%s", 100 * share, k,
                        "" if carry else " (or set residual to carry)")
    return out


calibrated.METHODS.update({"teleport": "teleportation", "redi": "ReDi"})
calibrated.EXTENSIONS.update({"teleport": (fit_teleport, run_teleport, True), "redi": (fit_redi, run_redi, False)})


class StrideCalibrateTeleport(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StrideCalibrateTeleport", display_name="Calibrate teleportation (Stride)",
            category=calibrated.CATEGORY,
            description="Gaussian statistics (mean, rank-r principal directions, isotropic rest) of samples of your "
                        "model under your conditioning and cfg, for the closed-form jump over the first steps. "
                        "Statistics are per conditioning (calibrate with the prompt you sample with) and serve "
                        "every schedule and step count: the sampler node chooses how much to jump.",
            inputs=[i for i in _calibrate_inputs([io.Int.Input("rank", default=16, min=1, max=256,
                                                               tooltip="Principal directions kept: at most samples "
                                                                       "- 1 (the node warns when samples cap it).")])
                    if i.id not in ("scheduler", "steps", "sigmas")],
            outputs=[io.String.Output(tooltip="The calibration: connect or paste it into the teleportation sampler.")])

    @classmethod
    def execute(cls, model, positive, negative, latent_image, cfg, samples, seed, rank) -> io.NodeOutput:
        return io.NodeOutput(_calibrate("teleport", model, positive, negative, latent_image, cfg, None, None,
                                        samples, seed, None, {"rank": rank}, TELEPORT_POINTS))


def _with_samples(inputs, default, tooltip):
    """The calibrate inputs with another default (and tooltip) for `samples`."""
    return [io.Int.Input("samples", default=default, min=1, max=64, tooltip=tooltip) if i.id == "samples" else i
            for i in inputs]


class StrideBuildReDi(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StrideBuildReDi", display_name="Build ReDi knowledge base (Stride)", category=calibrated.CATEGORY,
            description="ReDi's knowledge base: DDIM runs of your model on the calibration noises (and prompts), "
                        "each storing its state at key_step and at value_step, for this schedule, cfg and latent "
                        "size. More samples: better retrieval.",
            inputs=_with_samples(_calibrate_inputs([io.Int.Input("key_step", default=2, min=1, max=99,
                                                   tooltip="Steps run before the retrieval."),
                                      io.Int.Input("value_step", default=4, min=2, max=99,
                                                   tooltip="The step the run resumes at; the steps between are "
                                                           "retrieved.")]), 64,
                                "Stored trajectories (one per calibration noise): retrieval needs many; the node "
                                "warns when they explain too little of each other."),
            outputs=[io.String.Output(tooltip="The knowledge base: connect or paste it into the ReDi sampler.")])

    @classmethod
    def execute(cls, model, positive, negative, latent_image, cfg, scheduler, steps, samples, seed, key_step,
                value_step, sigmas=None) -> io.NodeOutput:
        return io.NodeOutput(_calibrate("redi", model, positive, negative, latent_image, cfg, scheduler, steps,
                                        samples, seed, sigmas, {"key_step": key_step, "value_step": value_step},
                                        1))


StrideSamplerTeleport = _sampler_node(
    "StrideSamplerTeleport", "teleport", "Teleportation sampler (Stride)",
    "The first part of the schedule jumped in closed form with the Gaussian statistics of your model, then "
    "DPM-Solver++ 2M on the rest. Refuses statistics of another model or cfg.",
    [io.Float.Input("skip", default=0.2, min=0.0, max=0.9, step=0.05,
                    tooltip="Share of the steps jumped (the paper keeps quality up to 0.15-0.3).")])
StrideSamplerReDi = _sampler_node(
    "StrideSamplerReDi", "redi", "ReDi sampler (Stride)",
    "DDIM with the steps between the knowledge base's key and value steps retrieved from stored trajectories of "
    "your model. Refuses a knowledge base of another model, schedule or cfg.",
    [io.Int.Input("neighbours", default=8, min=1, max=256, tooltip="Stored trajectories combined per image."),
     io.Combo.Input("residual", options=["carry", "off"], default="carry", optional=True,
                    tooltip="(expert) carry (Stride's default): add the part of the state the keys do not explain, "
                            "scaled by sigma_v / sigma_k; on every demo model it lowered the error 2-5x. off: the "
                            "retrieved state alone, as the ReDi paper does (it needs a knowledge base far larger "
                            "than the latent's size to pay).")])

NODES = [StrideSamplerParaDiGMS, StrideSamplerBottleneck, StrideCalibrateTeleport, StrideBuildReDi,
         StrideSamplerTeleport, StrideSamplerReDi]
