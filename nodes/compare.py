"""The "compare samplers on my model" tool: every sampler x scheduler x NFE measured against a high-accuracy
reference solve of the user's own model, as a Markdown table and an error-vs-NFE plot."""
import math
import time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
from comfy_api.latest import io, ui

from ..samplers.reference import sample_reference
from .counting import count_model_calls
from .sampler_bridge import SampleNotFinite

NO_FINAL_DENOISE = ("uni_pc", "uni_pc_bh2")  # ComfyUI's UniPC stops at sigma = 0.001: a floor under its error
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def parse_names(text, what, choices):
    """The comma-separated names in text, each checked against choices (duplicates dropped)."""
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise ValueError(f"Stride compare: list at least one {what}; choose from: {', '.join(choices)}")
    for name in names:
        if name not in choices:
            raise ValueError(f"Stride compare: unknown {what} '{name}'; choose from: {', '.join(choices)}")
    return names


def parse_nfes(text):
    """The comma-separated NFE budgets in text, sorted (whole numbers >= 1)."""
    entries = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not entries:
        raise ValueError("Stride compare: list at least one NFE (model evaluations), e.g. '4, 6, 8, 10'")
    for entry in entries:
        if not entry.isdigit() or int(entry) < 1:
            raise ValueError(f"Stride compare: NFE '{entry}' is not a whole number of model evaluations >= 1; "
                             "write e.g. '4, 6, 8, 10'")
    return sorted(int(e) for e in entries)


def relative_rmse(x, x_ref):
    """Per-image RMSE of x against x_ref over the latent, in units of x_ref's standard deviation ([batch])."""
    x_ref = x_ref.double()
    return (x.double() - x_ref).flatten(1).pow(2).mean(1).sqrt() / x_ref.std()


def schedule(model_sampling, sampler, scheduler, steps):
    """The sigmas KSampler would use: steps + 1 then drop the penultimate one for the samplers that want it."""
    if sampler in comfy.samplers.KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS:
        sigmas = comfy.samplers.calculate_sigmas(model_sampling, scheduler, steps + 1)
        return torch.cat([sigmas[:-2], sigmas[-1:]])
    return comfy.samplers.calculate_sigmas(model_sampling, scheduler, steps)


def fit_steps(run, nfe):
    """The run with the largest step count whose counted NFE <= nfe (the counted NFE grows with the steps).
    run(steps) -> a dict with "steps" and "nfe". Tries steps = nfe first; one run when a step costs one call."""
    steps, fit, over = nfe, None, nfe + 1  # over: the smallest step count known to cost too much
    while fit is None or fit["steps"] + 1 < over:
        if fit is not None:
            steps = fit["steps"] + 1
        result = run(steps)
        if result["nfe"] <= nfe:
            fit = result
            continue
        over = steps
        if steps == 1:
            return result  # the sampler cannot fit: reported with its counted NFE, never ranked
        if fit is None:  # shrink in proportion, e.g. Heun-type samplers: 2 calls per step
            steps = max(1, min(steps - 1, steps * nfe // result["nfe"]))
    return fit


def compare(model, positive, negative, latent, seed, cfg, samplers, schedulers, nfes, tolerance):
    """(rows, references) for every sampler x scheduler x NFE: a row has the error against the reference
    (nan when the run diverged), wall seconds, steps and counted NFE."""
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    model_sampling = model.get_model_object("model_sampling")
    counted, counter = count_model_calls(model)
    pbar = comfy.utils.ProgressBar(len(samplers) * len(schedulers) * len(nfes) + 1)

    def sample(sampler, sigmas):
        comfy.model_management.throw_exception_if_processing_interrupted()
        counter.reset()
        start = time.perf_counter()
        try:
            x = comfy.sample.sample_custom(counted, noise, cfg, sampler, sigmas, positive, negative, latent_image,
                                           noise_mask=latent.get("noise_mask"), seed=seed, disable_pbar=True)
        except SampleNotFinite:  # Stride's samplers stop with this error instead of returning NaN
            x = None
        return x, counter.nfe, time.perf_counter() - start

    references = {}  # one per distinct first sigma (ComfyUI's schedulers all start at sigma_max)
    rows = []
    for name in samplers:
        for scheduler in schedulers:
            for nfe in nfes:
                def run(steps):
                    sigmas = schedule(model_sampling, name, scheduler, steps)
                    x, calls, seconds = sample(comfy.samplers.sampler_object(name), sigmas)
                    return {"steps": steps, "nfe": calls, "seconds": seconds, "x": x, "sigma_start": float(sigmas[0])}
                row = fit_steps(run, nfe)
                key = round(row["sigma_start"], 5)
                if key not in references:
                    sigmas = torch.tensor([row["sigma_start"], float(model_sampling.sigma_min), 0.0])
                    solver = comfy.samplers.KSAMPLER(sample_reference, {"rtol": tolerance, "atol": tolerance})
                    x_ref, calls, seconds = sample(solver, sigmas)
                    if x_ref is None or not bool(torch.isfinite(x_ref).all()):
                        raise RuntimeError("Stride compare: the reference solve is not finite; check the model and cfg")
                    references[key] = {"x": x_ref, "nfe": calls, "seconds": seconds, "sigmas": sigmas}
                    pbar.update(1)
                x = row.pop("x")
                errors = relative_rmse(x, references[key]["x"]) if x is not None else torch.full((1,), math.nan)
                rows.append({**row, "sampler": name, "scheduler": scheduler, "target": nfe,
                             "error": errors.mean().item(), "median": errors.median().item()})
                pbar.update(1)
    return rows, references


def format_table(rows, references, cfg, seed, batch, tolerance):
    """Markdown: rows by NFE, best first; the best run that fits the NFE is marked, diverged runs say so."""
    ref = ", ".join(f"from sigma {r['sigmas'][0]:.4g}: {r['nfe']} model evaluations, {r['seconds']:.2f} s"
                    for r in references.values())
    lines = [f"## Samplers on this model (cfg {cfg}, seed {seed}, batch {batch})", "",
             "Error = per-image RMSE over the latent against the reference, in units of the reference's standard "
             "deviation, mean over the batch. Reference: the PF-ODE solved adaptively (Dormand-Prince 5(4), "
             f"tolerance {tolerance:g}) to the model's sigma_min, then denoised ({ref}). The median shows "
             "when a few images that blew up dominate the mean.", "",
             "| NFE | sampler | scheduler | steps | counted NFE | error (x ref. std) | median error | seconds | |",
             "|---:|---|---|---:|---:|---:|---:|---:|---|"]
    for nfe in sorted({r["target"] for r in rows}):
        group = sorted((r for r in rows if r["target"] == nfe),
                       key=lambda r: r["error"] if math.isfinite(r["error"]) else math.inf)
        best = next((r for r in group if math.isfinite(r["error"]) and r["nfe"] <= nfe), None)
        for r in group:
            error = f"{r['error']:.3g} | {r['median']:.3g}" if math.isfinite(r["error"]) else "diverged | diverged"
            lines.append(f"| {nfe} | {r['sampler']} | {r['scheduler']} | {r['steps']} | {r['nfe']} | {error} | "
                         f"{r['seconds']:.3f} | {'**best**' if r is best else ''} |")
    if any(r["nfe"] > r["target"] for r in rows):
        lines += ["", "A counted NFE above the requested one: the sampler cannot run with so few model evaluations "
                      "(never marked best)."]
    if any(r["sampler"] in NO_FINAL_DENOISE for r in rows):
        lines += ["", "uni_pc and uni_pc_bh2 integrate to sigma = 0.001 instead of taking a final denoise, which "
                      "puts a floor under their error."]
    return "\n".join(lines)


def _text(draw, xy, text, font, ax=0.0, ay=0.0):
    """Text anchored at a fraction (ax, ay) of its box (works with bitmap fonts, which lack PIL anchors)."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text((xy[0] - ax * (right - left) - left, xy[1] - ay * (bottom - top) - top), text, fill="black", font=font)


def to_image(image):
    """A PIL RGB image as a ComfyUI IMAGE [1, H, W, 3] in [0, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).unsqueeze(0)


def plot_errors(series, width=560, height=380):
    """IMAGE [1, H, W, 3] in [0, 1]: error (log scale) vs counted NFE, one line per (label, [(nfe, error)])."""
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    legend = 50 + max((probe.textbbox((0, 0), label, font=font)[2] for label, _ in series), default=0)
    image = Image.new("RGB", (width + legend, max(height, 80 + 16 * len(series))), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 70, 34, width - 16, image.height - 48
    points = [p for _, pts in series for p in pts]
    if not points:
        _text(draw, (left, top), "every run diverged: nothing to plot", font)
        return to_image(image)
    nfes = sorted({n for n, _ in points})
    n0, n1 = (nfes[0], nfes[-1]) if nfes[0] < nfes[-1] else (nfes[0] - 1, nfes[0] + 1)
    e0 = math.floor(math.log10(min(e for _, e in points)))
    e1 = max(math.ceil(math.log10(max(e for _, e in points))), e0 + 1)
    to_x = lambda n: left + (right - left) * (n - n0) / (n1 - n0)
    to_y = lambda e: bottom - (bottom - top) * (math.log10(e) - e0) / (e1 - e0)
    for k in range(e0, e1 + 1):
        draw.line((left, to_y(10 ** k), right, to_y(10 ** k)), fill=(225, 225, 225))
        _text(draw, (left - 6, to_y(10 ** k)), f"1e{k}", font, 1.0, 0.5)
    for n in nfes:
        draw.line((to_x(n), top, to_x(n), bottom), fill=(225, 225, 225))
        _text(draw, (to_x(n), bottom + 6), str(n), font, 0.5, 0.0)
    draw.rectangle((left, top, right, bottom), outline="black")
    _text(draw, ((left + right) / 2, image.height - 8), "NFE (model evaluations, counted)", font, 0.5, 1.0)
    _text(draw, (left - 60, top - 10), "error vs reference (x reference std, log scale)", font, 0.0, 1.0)
    for i, (label, pts) in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        xy = [(to_x(n), to_y(e)) for n, e in sorted(pts)]
        if len(xy) > 1:
            draw.line(xy, fill=color, width=2)
        marker = draw.ellipse if i < len(PALETTE) else draw.rectangle  # past 10 lines, colours repeat
        for x, y in xy:
            marker((x - 3, y - 3, x + 3, y + 3), fill=color)
        y = top + 8 + 16 * i
        draw.line((width, y, width + 24, y), fill=color, width=3)
        _text(draw, (width + 30, y), label, font, 0.0, 0.5)
    return to_image(image)


def error_series(rows):
    """[(label, [(counted NFE, error)])] per sampler/scheduler pair, diverged runs left out."""
    series = {}
    for r in rows:
        points = series.setdefault(f"{r['sampler']} / {r['scheduler']}", [])
        if math.isfinite(r["error"]) and r["error"] > 0:
            points.append((r["nfe"], r["error"]))
    return list(series.items())


class StrideCompareSamplers(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StrideCompareSamplers",
            display_name="Compare samplers on my model (Stride)",
            category="sampling/stride/tools",
            description="Runs every listed sampler x scheduler x NFE on your model, from the same noise and "
                        "conditioning, and measures each against a high-accuracy reference solve of the model's own "
                        "ODE: a table of error, counted model evaluations and wall time, and an error-vs-NFE plot. "
                        "Use it to learn which sampler to use for your model.",
            inputs=[
                io.Model.Input("model", tooltip="The model to measure the samplers on."),
                io.Conditioning.Input("positive", tooltip="Positive conditioning, as for KSampler."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning, as for KSampler."),
                io.Latent.Input("latent_image", tooltip="The latent to sample (its batch is the test set; a "
                                                        "small batch keeps the comparison fast)."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="The noise seed; every run and the reference start from the same noise."),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale, as for KSampler."),
                io.String.Input("samplers", default="euler, dpmpp_2m, stride_dpmpp_2m, stride_unipc_bh2",
                                tooltip="Comma-separated sampler names, as in KSampler's list (stride_* included)."),
                io.String.Input("schedulers", default="karras, simple",
                                tooltip="Comma-separated scheduler names, as in KSampler's list."),
                io.String.Input("nfes", default="4, 6, 8, 10",
                                tooltip="Comma-separated budgets of model evaluations (NFE, a CFG pair counts "
                                        "once). Steps are chosen so each sampler's counted NFE fits the budget "
                                        "(Heun-type samplers spend 2 per step)."),
                io.Float.Input("reference_tolerance", default=1e-4, min=1e-7, max=1e-2, step=1e-7, round=False,
                               tooltip="Tolerance of the adaptive reference solve: smaller is slower and more "
                                       "exact. Keep it well below the errors you want to tell apart."),
            ],
            outputs=[
                io.String.Output(display_name="table", tooltip="Markdown table: error against the reference, "
                                 "counted NFE and wall seconds per run, the best run per NFE marked."),
                io.Image.Output(display_name="plot", tooltip="Error vs NFE (log error axis), one line per "
                                "sampler/scheduler pair."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, cfg, samplers, schedulers, nfes,
                reference_tolerance) -> io.NodeOutput:
        names = parse_names(samplers, "sampler", comfy.samplers.SAMPLER_NAMES)
        scheds = parse_names(schedulers, "scheduler", comfy.samplers.SCHEDULER_NAMES)
        budgets = parse_nfes(nfes)
        rows, references = compare(model, positive, negative, latent_image, seed, cfg, names, scheds, budgets,
                                   reference_tolerance)
        table = format_table(rows, references, cfg, seed, latent_image["samples"].shape[0], reference_tolerance)
        plot = plot_errors(error_series(rows))
        return io.NodeOutput(table, plot, ui={"text": (table,), **ui.PreviewImage(plot, cls=cls).as_dict()})


NODES = [StrideCompareSamplers]
