"""Guidance at few steps: constant CFG vs RAAG vs the CFG schedules, quality and model evaluations per image.

    .venv/bin/python -m bench.guidance [--quick] [--json PATH] [--models a,b]

Protocol. Each model draws digits 0-9 x N seeds (seed s gives the noise of one batch of the ten digits, as in
bench.quality) with ComfyUI's `comfy.sample.sample` (the KSampler path): euler, scheduler "normal" for the EPS
models and "simple" for the flow models, at 4, 6 and 10 steps, for base scales 5 and 8 (the cfg given to the
sampler), plus 30 steps for constant CFG (the RAAG paper's comparison: 10-step RAAG vs 30-step CFG) and for RAAG
and no guidance (to show what they converge to). Methods, each built through its node's execute:
- cfg: constant CFG, no patch;
- raag w=cfg: StrideRAAG with max_guidance = the base scale, alpha at the node default (144, on the squared RATIO);
- raag 18/144: StrideRAAG at its node defaults (max_guidance 18, alpha 144); it replaces the sampler's cfg, so it is
  run once per model and compared with both base scales;
- linear, cosine, interval, clamp_linear: StrideCFGSchedule around the base scale, every option at the node's
  default (interval 0.2-0.8 of the progress) except clamp_linear's floor, 2 (Wang et al.'s choice);
- no guidance: cfg 1, the conditional model alone (a control: how good weaker guidance looks on these metrics).
Nothing is tuned. Metrics per row:
- accuracy: the digit classifier (demo/classifier.py) on the generated latents against the requested digit;
- FD: Frechet distance in the classifier's penultimate features, to 2000 exact samples of the class-conditional
  mixture (oracles) or to the held-out real digits (trained models); the first row of each table is its floor,
  N exact samples or N real training digits per digit measured the same way;
- log-lik (oracles only): mean and median log-density, nats per 256-d latent, of the generated latents under the
  exact class-conditional mixture noised to the model's sigma_min;
- evals / image: model evaluations counted inside the model, conditional + unconditional passes, so a batched
  CFG pair counts as 2 (the point is the unconditional passes saved); seconds: wall time of the whole batch.
RAAG-3x anchor: per model and base scale, the fewest steps at which each method's accuracy and FD (and, for the
oracles, accuracy and log-lik) are at least as good as 30-step constant CFG's, with no tolerance; constant CFG
and no guidance are controls.
"""
import math
import time

import torch

from . import host
from .common import ModelSetup, parser, write_json
from .reference import alpha_of
from .quality import SCHEDULERS, available, balanced_subset, frechet_distance

MODES = {"full": dict(seeds=8, steps=(4, 6, 10), scales=(5.0, 8.0)),
         "quick": dict(seeds=1, steps=(4, 10), scales=(5.0,))}
QUICK_MODELS = ("oracle_flow", "dit_small")
ORACLE_TARGET = 2000  # exact conditional samples (200 per digit) the oracles' FD is measured against
REFERENCE_STEPS = 30
SAMPLER = "euler"
SCHEDULES = {"linear": {}, "cosine": {}, "interval": {}, "clamp_linear": {"floor": 2.0}}
METHODS = ("cfg", "raag w=cfg", "raag 18/144", *SCHEDULES, "no guidance")
SCALE_FREE = {"raag 18/144": "w_max 18", "no guidance": "1"}  # run once per model; what the base cfg column shows


def node_defaults(node):
    """The node's widget defaults (everything but the MODEL input)."""
    return {i.id: i.default for i in node.define_schema().inputs if i.id != "model"}


def patched(model, method, cfg):
    """The MODEL a user would wire into KSampler for this method (built through the node's execute)."""
    nodes = host.stride("nodes.guidance")
    if method in ("cfg", "no guidance"):
        return model
    if method.startswith("raag"):
        options = node_defaults(nodes.StrideRAAG)
        if method == "raag w=cfg":
            options["max_guidance"] = cfg
        return nodes.StrideRAAG.execute(model, **options).result[0]
    options = {**node_defaults(nodes.StrideCFGSchedule), **SCHEDULES[method], "schedule": method}
    return nodes.StrideCFGSchedule.execute(model, **options).result[0]


class Judge:
    """Quality of a batch of latents: accuracy, FD to a set of real (or exact) digits, log-lik (oracles)."""

    def __init__(self, setup):
        self.setup, self.n = setup, len(setup.labels)
        self.classifier = host.stride("demo.classifier").load()
        if setup.is_oracle:  # the target: exact samples of the conditional mixture, a large set and one of n
            sample = lambda n, seed: setup.mixture.sample(n, torch.arange(10).repeat(n // 10),
                                                          torch.Generator().manual_seed(seed)).view(-1, 4, 8, 8)
            target, self.real = sample(ORACLE_TARGET, 1), (sample(self.n, 0), torch.arange(10).repeat(self.n // 10))
        else:  # the held-out real digits; n real training digits
            split = host.stride("demo.train").digits_split()
            target, self.real = split.held_x, balanced_subset(split.train_x, split.train_y, self.n // 10)
        self.target = self.classifier.features(target.float()).detach()
        self.sigma = torch.full((self.n,), float(setup.model_sampling.sigma_min), dtype=torch.float64)
        self.alpha = alpha_of(setup.model_sampling)(float(self.sigma[0])) * torch.ones_like(self.sigma)

    def __call__(self, x, labels):
        x = x.float()
        out = {"accuracy": self.classifier.accuracy(x, labels), "finite": bool(torch.isfinite(x).all()),
               "fd": frechet_distance(self.classifier.features(x).detach(), self.target)}
        if self.setup.is_oracle:
            ll = self.setup.mixture.log_prob(x.flatten(1).double(), self.sigma, self.alpha, labels)
            out.update(loglik=ll.mean().item(), loglik_median=ll.median().item())
        return out

    def reference(self):
        """The same metrics on n exact samples (oracles) or n real training digits: the floor at this size."""
        label = "exact samples of the conditional mixture" if self.setup.is_oracle else "real training digits"
        return dict(self(*self.real), label=f"{label} ({self.n // 10} per digit)")


def sample(setup, model, steps, cfg):
    """comfy.sample.sample with a counter inside the model; (x, cond passes, uncond passes, seconds)."""
    import comfy.sample
    counted, counter = host.stride("nodes.counting").count_model_calls(model)
    start = time.perf_counter()
    with torch.inference_mode():
        x = comfy.sample.sample(counted, setup.noise, steps, cfg, SAMPLER, SCHEDULERS[setup.name], setup.positive,
                                setup.negative, setup.latent, seed=0, disable_pbar=True)
    seconds = time.perf_counter() - start
    return x.clone(), counter.cond, counter.uncond, seconds  # a clone outside inference mode: a normal tensor


def measure(models, seeds, steps, scales):
    """One list of rows per model: the reference row first, then method x base scale x steps."""
    results = {}
    for name in available(models):
        setup = ModelSetup(name, range(seeds))
        judge = Judge(setup)
        rows = [dict(judge.reference(), method="reference", cfg=None, steps=None)]
        runs = [(m, None, s) for m in SCALE_FREE for s in (*steps, REFERENCE_STEPS)]
        for cfg in scales:  # RAAG's 30-step rows show what it converges to (not part of the anchor)
            runs += [(m, cfg, s) for m in ("cfg", "raag w=cfg") for s in (*steps, REFERENCE_STEPS)]
            runs += [(m, cfg, s) for m in SCHEDULES for s in steps]
        for method, cfg, n in runs:
            x, cond, uncond, seconds = sample(setup, patched(setup.model, method, cfg), n, cfg or 1.0)
            rows.append(dict(judge(x, setup.labels), method=method, cfg=cfg, steps=n, cond_passes=cond,
                             uncond_passes=uncond, evals_per_image=cond + uncond, seconds=seconds))
        results[name] = rows
    return results


def at_least(row, ref, key):
    """Accuracy no lower, and log-lik no lower or FD no higher, than ref's."""
    good = row[key] >= ref[key] if key == "loglik" else row[key] <= ref[key]
    return row["accuracy"] >= ref["accuracy"] and good


def anchor(results, steps, scales, key):
    """{model: {cfg: {method: fewest steps matching 30-step constant CFG on accuracy and key, or None}}}."""
    out = {}
    for name, rows in ((n, r) for n, r in results.items() if key in r[0]):
        out[name] = {}
        for cfg in scales:
            ref = next(r for r in rows if r["method"] == "cfg" and r["cfg"] == cfg and r["steps"] == REFERENCE_STEPS)
            out[name][cfg] = {}
            for method in METHODS:
                same = [r for r in rows if r["method"] == method and r["steps"] in steps
                        and r["cfg"] == (None if method in SCALE_FREE else cfg)]
                hits = sorted(r["steps"] for r in same if at_least(r, ref, key))
                out[name][cfg][method] = hits[0] if hits else None
    return out


def fmt(v, spec):
    return "" if v is None else (f"{v:{spec}}" if math.isfinite(v) else str(v))


def table(name, rows, images):
    oracle = "loglik" in rows[0]
    fd = "FD to 2000 exact samples" if oracle else "FD to held-out real"
    lines = [f"### {name} ({SCHEDULERS[name]} scheduler, {SAMPLER}, {images} images per row)\n",
             f"| method | base cfg | steps | accuracy | {fd} |{' log-lik mean / median (nats) |' * oracle} "
             "evals / image (cond + uncond) | seconds |", "|---|---|---|---|---|---|---|" + "---|" * oracle]
    for r in rows:
        q = fmt(r["fd"], ".2f") + ("" if r["finite"] else " (non-finite latents)")
        q += f" | {fmt(r['loglik'], '.1f')} / {fmt(r['loglik_median'], '.1f')}" if oracle else ""
        cfg = SCALE_FREE.get(r["method"], fmt(r["cfg"], "g"))
        evals = f"{r['evals_per_image']} ({r['cond_passes']} + {r['uncond_passes']})" if "cond_passes" in r else ""
        lines.append(f"| {r.get('label', r['method'])} | {cfg} | {r['steps'] or ''} | {100 * r['accuracy']:.1f}% | "
                     f"{q} | {evals} | {fmt(r.get('seconds'), '.2f')} |")
    return "\n".join(lines)


def anchor_table(summary):
    lines = ["| model | base cfg | " + " | ".join(METHODS) + " |", "|---|---|" + "---|" * len(METHODS)]
    for name, per_cfg in summary.items():
        for cfg, per_method in per_cfg.items():
            cells = [f"{s} (x{REFERENCE_STEPS / s:.1f})" if s else "not reached" for s in per_method.values()]
            lines.append(f"| {name} | {cfg:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--models", help=f"comma-separated subset of {', '.join(SCHEDULERS)}")
    p.add_argument("--seeds", type=int, help="seeds (batches of the ten digits) per row")
    args = p.parse_args()
    mode = "quick" if args.quick else "full"
    settings = dict(MODES[mode], **({"seeds": args.seeds} if args.seeds else {}))
    models = args.models.split(",") if args.models else (QUICK_MODELS if args.quick else list(SCHEDULERS))
    if set(models) - set(SCHEDULERS):
        p.error(f"unknown models {sorted(set(models) - set(SCHEDULERS))}; choose from {list(SCHEDULERS)}")
    host.boot()
    start = time.perf_counter()
    results = measure(models, **settings)
    anchors = {key: anchor(results, settings["steps"], settings["scales"], key) for key in ("fd", "loglik")}
    images = 10 * settings["seeds"]
    print(f"\n## Guidance at few steps ({mode} run, {images} images per row, {SAMPLER}, "
          f"{time.perf_counter() - start:.0f} s)\n")
    for name, rows in results.items():
        print(table(name, rows, images) + "\n")
    print("evals / image: model evaluations counted inside the model, a conditional and an unconditional pass "
          "counting 2 (the papers' NFE is the conditional count). raag 18/144: the node defaults (max_guidance 18, "
          "alpha 144 on the squared RATIO), independent of the base cfg; raag w=cfg: max_guidance = the base cfg. no guidance: cfg 1. FD lower is better; the "
          "first row is its floor at this sample size. Log-lik: under the exact conditional mixture at the model's "
          "sigma_min; it rewards mode-seeking (strong guidance, blurred few-step samples score above exact samples), "
          "so higher is not simply better. Seconds: CPU, one thread, a shared 2-core machine (noisy).\n")
    steps = ", ".join(map(str, settings["steps"]))
    for key, what in (("fd", "FD"), ("loglik", "log-lik (oracles)")):
        print(f"### RAAG-3x anchor by accuracy and {what}: fewest steps (of {steps}) at which a method is at least "
              f"as good as {REFERENCE_STEPS}-step constant CFG (step ratio; no tolerance; cfg and no guidance are controls)\n")
        print(anchor_table(anchors[key]) + "\n")
    write_json(args.json, {"mode": mode, **settings, "sampler": SAMPLER, "reference_steps": REFERENCE_STEPS,
                           "results": results, "anchor": {k: {n: {str(c): v for c, v in d.items()}
                                                              for n, d in a.items()} for k, a in anchors.items()}})


if __name__ == "__main__":
    main()
