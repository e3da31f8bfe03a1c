"""Baseline: ComfyUI's own samplers x schedulers on the exact oracle, error against x_ref per NFE.

    .venv/bin/python -m bench.solvers [--quick] [--json PATH]

Error = per-image RMSE over the latent against x_ref (the guided PF-ODE solved to the model's
sigma_min with the reference solver from the same noise, then denoised), in units of the data standard
deviation, averaged over digits 0-9 x seeds. NFE is counted inside the model (a CFG pair counts once).
"""
import math
import time

import torch

from . import host
from .common import OracleSetup, parser, write_json
from .reference import error_vs_reference, oracle_reference

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
QUICK = {"samplers": ["euler", "heun", "dpmpp_2m", "uni_pc*", "deis"], "schedulers": ["simple", "karras"],
         "nfes": [4, 6, 10, 20], "seeds": [0], "rtol": 1e-7}
FULL = {"samplers": list(SAMPLERS), "schedulers": SCHEDULERS + list(SCHEDULE_NODES), "nfes": NFES,
        "seeds": [0, 1], "rtol": 1e-8}


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


def measure(config):
    rows = []
    for param in ("eps", "flow"):
        setup = OracleSetup(param, config["seeds"])
        data_std = setup.mixture.data_std()
        references = {}
        for cfg in (1.0, 5.5):
            for scheduler in config["schedulers"]:
                if scheduler in SCHEDULE_NODES and param != "eps":
                    continue
                for label in config["samplers"]:
                    for nfe in config["nfes"]:
                        steps = steps_for(label, nfe)
                        sigmas = schedule(setup.model_sampling, label, scheduler, steps)
                        key = (cfg, round(float(sigmas[0]), 5))
                        if key not in references:
                            references[key] = oracle_reference(setup.mixture, setup.model_sampling, sigmas[0],
                                                               setup.noise, setup.labels, cfg, config["rtol"])
                        x, counter, seconds = setup.sample(sampler_object(label), sigmas, cfg)
                        err = error_vs_reference(x, references[key], data_std)
                        rows.append({"param": param, "cfg": cfg, "sampler": label, "scheduler": scheduler,
                                     "target_nfe": nfe, "steps": steps, "nfe": counter.nfe,
                                     "uncond_passes": counter.uncond, "error": err.mean().item(),
                                     "median_error": err.median().item(), "seconds": seconds,
                                     "model_seconds": counter.seconds})
    return rows


def error_table(rows, param, cfg, nfes):
    """Markdown: sampler x scheduler rows, NFE columns of 'mean / median' error; '(n)' marks a counted NFE
    that differs from the column's."""
    lines = [f"| sampler | scheduler | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
             "|---|---|" + "---|" * len(nfes)]
    cells = {}
    for r in rows:
        if r["param"] == param and r["cfg"] == cfg:
            mark = "" if r["nfe"] == r["target_nfe"] else f" ({r['nfe']})"
            cells.setdefault((r["sampler"], r["scheduler"]), {})[r["target_nfe"]] = \
                f"{r['error']:.3g} / {r['median_error']:.3g}{mark}"
    for (sampler, scheduler), by_nfe in cells.items():
        lines.append(f"| {sampler} | {scheduler} | " + " | ".join(by_nfe.get(n, "") for n in nfes) + " |")
    return "\n".join(lines)


def best_table(rows, nfes):
    """Markdown: the best sampler/scheduler pair per setting and NFE."""
    lines = ["| model | cfg | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|---|" + "---|" * len(nfes)]
    for param in ("eps", "flow"):
        for cfg in (1.0, 5.5):
            best = []
            for n in nfes:
                pool = [r for r in rows if r["param"] == param and r["cfg"] == cfg and r["target_nfe"] == n
                        and r["nfe"] <= n]
                top = min(pool, key=lambda r: r["error"], default=None)
                best.append(f"{top['error']:.3g} {top['sampler']}/{top['scheduler']}" if top else "")
            lines.append(f"| oracle {param} | {cfg} | " + " | ".join(best) + " |")
    return "\n".join(lines)


def overhead_table(rows):
    """Markdown: wall time per step, time inside the model, and the sampler's own overhead per step."""
    lines = ["| sampler | ms / step | in model ms / step | overhead ms / step |", "|---|---|---|---|"]
    by_sampler = {}
    for r in rows:
        by_sampler.setdefault(r["sampler"], []).append(r)
    for sampler, rs in by_sampler.items():
        steps = sum(r["steps"] for r in rs)
        total, model = sum(r["seconds"] for r in rs), sum(r["model_seconds"] for r in rs)
        lines.append(f"| {sampler} | {1e3 * total / steps:.2f} | {1e3 * model / steps:.2f} | "
                     f"{1e3 * (total - model) / steps:.2f} |")
    return "\n".join(lines)


def main():
    args = parser(__doc__.splitlines()[0]).parse_args()
    config = QUICK if args.quick else FULL
    host.boot()
    torch.manual_seed(0)
    start = time.perf_counter()
    rows = measure(config)
    print(f"\n## Baseline: ComfyUI samplers on the exact oracle ({'quick' if args.quick else 'full'} run, "
          f"{len(config['seeds']) * 10} images per cell, {time.perf_counter() - start:.0f} s)\n")
    print("Best sampler/scheduler per NFE (mean error vs x_ref, in data standard deviations):\n")
    print(best_table(rows, config["nfes"]))
    for param in ("eps", "flow"):
        for cfg in (1.0, 5.5):
            print(f"\n### oracle {param}, cfg {cfg}: mean / median per-image error\n")
            print(error_table(rows, param, cfg, config["nfes"]))
    print("\n### Per-step cost (all runs above, CPU)\n")
    print(overhead_table(rows))
    print("\n`*` uni_pc and uni_pc_bh2 integrate to sigma = 0.001 instead of taking a final denoise, which puts a "
          "floor under their error; with a named scheduler they drop the penultimate sigma, as KSampler does.")
    write_json(args.json, {"config": {k: v for k, v in config.items()}, "rows": rows})


if __name__ == "__main__":
    main()
