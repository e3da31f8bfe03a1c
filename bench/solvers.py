"""Baseline: ComfyUI's own samplers x schedulers on the demo models, error against x_ref per NFE.

    .venv/bin/python -m bench.solvers [--quick] [--json PATH]

Error = per-image RMSE over the latent against x_ref (the guided PF-ODE solved to the model's
sigma_min with the reference solver from the same noise, then denoised: analytic for the exact oracle,
the network's own ODE at tolerance 1e-5 for the trained models), in units of the data standard
deviation, averaged over digits 0-9 x seeds. NFE is counted inside the model (a CFG pair counts once).
"""
import os
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
SCHEDULERS = ["simple", "karras", "exponential", "beta", "sgm_uniform", "kl_optimal"]
SCHEDULE_NODES = {"AYS (SD1)": ("AlignYourStepsScheduler", {"model_type": "SD1"}),
                  "GITS 1.20": ("GITSScheduler", {"coeff": 1.20})}   # EPS (SD1.5 schedule) only
NFES = [4, 5, 6, 8, 10, 15, 20]
ORACLE_GRID = {"samplers": list(SAMPLERS), "schedulers": SCHEDULERS + list(SCHEDULE_NODES), "nfes": NFES,
               "cfgs": [1.0, 5.5], "seeds": [0, 1], "rtol": 1e-8}
NETWORK_GRID = {"samplers": ["euler", "heun", "dpmpp_2m", "dpmpp_3m_sde eta=0", "uni_pc*", "deis", "ipndm"],
                "schedulers": ["simple", "karras", "exponential", "beta", "AYS (SD1)"], "nfes": [4, 6, 8, 10, 15, 20],
                "cfgs": [1.0, 3.0], "seeds": [0, 1], "rtol": 1e-5}
FULL = {"oracle_eps": ORACLE_GRID, "oracle_flow": ORACLE_GRID, "unet_large": NETWORK_GRID,
        "unet_small": NETWORK_GRID, "dit_large": NETWORK_GRID, "dit_small": NETWORK_GRID}
_QUICK_ORACLE = {"samplers": ["euler", "heun", "dpmpp_2m", "uni_pc*", "deis"], "schedulers": ["simple", "karras"],
                 "nfes": [4, 6, 10, 20], "cfgs": [1.0, 5.5], "seeds": [0], "rtol": 1e-7}
_QUICK_NETWORK = {"samplers": ["euler", "dpmpp_2m"], "schedulers": ["karras"], "nfes": [4, 10], "cfgs": [3.0],
                  "seeds": [0], "rtol": 1e-4}
QUICK = {"oracle_eps": _QUICK_ORACLE, "oracle_flow": _QUICK_ORACLE, "unet_small": _QUICK_NETWORK,
         "dit_small": _QUICK_NETWORK}
EPS_MODELS = {"oracle_eps", "unet_large", "unet_small"}  # AYS/GITS are SD1.5-schedule nodes


def sampler_object(label):
    import comfy.samplers
    name, options, _ = SAMPLERS[label]
    return comfy.samplers.sampler_object(name) if options is None else comfy.samplers.ksampler(name, options)


def steps_for(label, nfe):
    per_step = SAMPLERS[label][2]
    return nfe if per_step == 1 else (nfe + 1) // 2  # Heun's last step is a plain Euler step


def schedule(model_sampling, label, scheduler, steps):
    """Sigmas as a user gets them: KSampler's handling for named schedulers, the node's output otherwise."""
    import comfy.samplers
    import nodes
    if scheduler in SCHEDULE_NODES:
        node_id, options = SCHEDULE_NODES[scheduler]
        return nodes.NODE_CLASS_MAPPINGS[node_id].execute(steps=steps, denoise=1.0, **options).result[0]
    name = SAMPLERS[label][0]
    if name in comfy.samplers.KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS:
        sigmas = comfy.samplers.calculate_sigmas(model_sampling, scheduler, steps + 1)
        return torch.cat([sigmas[:-2], sigmas[-1:]])
    return comfy.samplers.calculate_sigmas(model_sampling, scheduler, steps)


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
        for cfg in grid["cfgs"]:
            for scheduler in grid["schedulers"]:
                if scheduler in SCHEDULE_NODES and name not in EPS_MODELS:
                    continue
                for label in grid["samplers"]:
                    for nfe in grid["nfes"]:
                        steps = steps_for(label, nfe)
                        sigmas = schedule(setup.model_sampling, label, scheduler, steps)
                        key = (cfg, round(float(sigmas[0]), 5))
                        if key not in references:
                            references[key] = setup.reference(sigmas[0], cfg, grid["rtol"])
                        x, counter, seconds = setup.sample(sampler_object(label), sigmas, cfg)
                        err = error_vs_reference(x, references[key], data_std)
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


def overhead_table(rows):
    """Markdown: wall time per step, time inside the model, and the sampler's own overhead per step."""
    lines = ["| model | sampler | ms / step | in model ms / step | overhead ms / step |", "|---|---|---|---|---|"]
    groups = {}
    for r in rows:
        groups.setdefault((r["model"], r["sampler"]), []).append(r)
    for (model, sampler), rs in groups.items():
        steps = sum(r["steps"] for r in rs)
        total, inside = sum(r["seconds"] for r in rs), sum(r["model_seconds"] for r in rs)
        lines.append(f"| {model} | {sampler} | {1e3 * total / steps:.2f} | {1e3 * inside / steps:.2f} | "
                     f"{1e3 * (total - inside) / steps:.2f} |")
    return "\n".join(lines)


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--models", help=f"comma-separated subset of {', '.join(FULL)}")
    args = p.parse_args()
    plan = QUICK if args.quick else FULL
    if args.models:
        unknown = set(args.models.split(",")) - set(plan)
        if unknown:
            p.error(f"unknown models {sorted(unknown)}; choose from {list(plan)}")
        plan = {name: plan[name] for name in args.models.split(",")}
    host.boot()
    start = time.perf_counter()
    rows = measure(plan)
    nfes = sorted({r["target_nfe"] for r in rows})
    print(f"\n## Baseline: ComfyUI samplers on the demo models ({'quick' if args.quick else 'full'} run, "
          f"{time.perf_counter() - start:.0f} s)\n")
    print("Best sampler/scheduler per NFE (mean error vs x_ref, in data standard deviations):\n")
    print(best_table(rows, nfes))
    for model, cfg in settings(rows):
        images = len(plan[model]["seeds"]) * 10
        print(f"\n### {model}, cfg {cfg}: mean / median per-image error ({images} images)\n")
        print(error_table(rows, model, cfg, sorted({r["target_nfe"] for r in rows if r["model"] == model})))
    print("\n### Per-step cost (all runs above, CPU, one thread)\n")
    print(overhead_table(rows))
    print("\n`*` uni_pc and uni_pc_bh2 integrate to sigma = 0.001 instead of taking a final denoise, which puts a "
          "floor under their error; with a named scheduler they drop the penultimate sigma, as KSampler does.")
    write_json(args.json, {"plan": plan, "rows": rows})


if __name__ == "__main__":
    main()
