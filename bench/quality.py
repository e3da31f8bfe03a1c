"""Quality of the embedded models: do they draw the digit asked for, and do their digits look real?

    .venv/bin/python -m bench.quality [--quick] [--json PATH] [--samplers a,b --steps N --models m,n]

Each model draws N images per digit (seed s gives the noise of one batch of the ten digits, the same for
every model) with ComfyUI's `comfy.sample.sample`: euler, 50 steps, cfg 3, scheduler "normal" for the EPS
models and "simple" for the flow models. The two exact oracles are the reference rows.
- accuracy: the digit classifier (demo/classifier.py, trained on the training split only) on the
  generated latents, against the requested digit;
- FD: Frechet distance between the generated latents and the held-out real ones in the classifier's
  penultimate features; the floor row is N real training digits per digit against the same held-out set;
- clean: the share of samples as close to a training digit (nearest one, in latent space) as 95% of the real
  held-out digits are: salt-and-pepper noise puts a sample far from every digit, which accuracy and FD forgive;
- ms / NFE: time inside the model per evaluation of a batch of ten images with its CFG pair.
With --samplers (any KSampler names, stride_* included) and --steps, each model is sampled with each sampler
instead: a distribution-level comparison for samplers, such as stochastic ones, whose individual samples are
not meant to match the ODE's.
"""
import os
import time

import torch

from . import host
from .common import parser, write_json

SCHEDULERS = {"oracle_eps": "normal", "oracle_flow": "simple", "unet_large": "normal", "unet_small": "normal",
              "dit_large": "simple", "dit_small": "simple"}
STEPS, CFG = 50, 3.0
PER_DIGIT = {"full": 36, "quick": 4}
DIGITS = torch.arange(10)


def load(name):
    """(ModelPatcher, positive CONDITIONING for DIGITS, negative CONDITIONING, parameter count or None)."""
    demo = host.stride("nodes.demo")
    patcher, positive, negative = demo.load_demo_model(name, DIGITS, 1.0, False)
    params = None if name in demo.ORACLES else sum(p.numel() for p in patcher.model.diffusion_model.parameters())
    return patcher, positive, negative, params


def generate(name, seeds, steps=STEPS, cfg=CFG, sampler="euler"):
    """Latents [10 * len(seeds), 4, 8, 8] (digits 0-9 per seed), their labels, ms per model evaluation and
    the parameter count (None for an oracle)."""
    import comfy.sample
    patcher, positive, negative, params = load(name)
    model, counter = host.stride("nodes.counting").count_model_calls(patcher)
    latent = torch.zeros(len(DIGITS), 4, 8, 8)
    out = []
    for seed in seeds:
        noise = comfy.sample.prepare_noise(latent, seed)
        out.append(comfy.sample.sample(model, noise, steps, cfg, sampler, SCHEDULERS[name], positive, negative,
                                       latent, seed=seed, disable_pbar=True))
    return torch.cat(out).float(), DIGITS.repeat(len(seeds)), 1e3 * counter.seconds / max(1, counter.nfe), params


def frechet_distance(a, b):
    """|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^1/2) between two sets of feature rows."""
    a, b = a.double(), b.double()
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(ca)
    root_a = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T
    m = root_a @ cb @ root_a
    cross = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    diff = a.mean(0) - b.mean(0)
    return (diff @ diff + ca.trace() + cb.trace() - 2 * cross).item()


CLEAN_QUANTILE = 0.95


def nearest_distance(x, train):
    """Distance of each row of x to its nearest training digit, in latent space."""
    return torch.cdist(x.flatten(1).double(), train.flatten(1).double()).min(1).values


def clean_share(x, split):
    """The share of x as close to a training digit as CLEAN_QUANTILE of the real held-out digits are."""
    limit = torch.quantile(nearest_distance(split.held_x, split.train_x), CLEAN_QUANTILE)
    return float((nearest_distance(x, split.train_x) <= limit).double().mean())


def balanced_subset(x, y, per_digit, seed=0):
    """per_digit random rows of each digit (seeded), digits 0-9 in turn."""
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.nonzero(y == d).view(-1) for d in range(10)]
    idx = torch.cat([r[torch.randperm(len(r), generator=gen)[:per_digit]] for r in rows])
    return x[idx], y[idx]


def available(names):
    nm = host.stride("nodes.neural_models")
    return [n for n in names if n not in nm.SPECS or os.path.exists(nm.weights_path(n))]


def measure(per_digit, models=None, samplers=("euler",), steps=STEPS):
    classifier = host.stride("demo.classifier").load()
    split = host.stride("demo.train").digits_split()
    held = classifier.features(split.held_x).detach()
    real_x, real_y = balanced_subset(split.train_x, split.train_y, per_digit)
    rows = [{"model": f"real training digits ({per_digit} per digit)", "parameters": None, "ms_per_nfe": None,
             "accuracy": classifier.accuracy(real_x, real_y),
             "fd": frechet_distance(classifier.features(real_x).detach(), held)}]
    for name, sampler in [(n, s) for n in available(models or SCHEDULERS) for s in samplers]:
        start = time.perf_counter()
        x, labels, ms, params = generate(name, range(per_digit), steps, CFG, sampler)
        per_class = [classifier.accuracy(x[labels == d], labels[labels == d]) for d in range(10)]
        rows.append({"model": name, "sampler": sampler, "steps": steps, "parameters": params, "ms_per_nfe": ms,
                     "scheduler": SCHEDULERS[name],
                     "accuracy": classifier.accuracy(x, labels), "worst_digit_accuracy": min(per_class),
                     "fd": frechet_distance(classifier.features(x).detach(), held),
                     "clean": clean_share(x, split), "finite": bool(torch.isfinite(x).all()),
                     "seconds": time.perf_counter() - start})
    return rows, classifier.accuracy(split.held_x, split.held_y)


def table(rows):
    lines = ["| model | sampler | scheduler | parameters | ms / NFE | accuracy | worst digit | FD to held-out | "
             "clean |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        params = "exact (analytic)" if r["model"].startswith("oracle") else \
            (f"{r['parameters'] / 1e6:.2f} M" if r["parameters"] else "")
        ms = f"{r['ms_per_nfe']:.2f}" if r["ms_per_nfe"] is not None else ""
        worst = f"{100 * r['worst_digit_accuracy']:.0f}%" if "worst_digit_accuracy" in r else ""
        sampler = f"{r['sampler']}, {r['steps']} steps" if "sampler" in r else ""
        clean = f"{100 * r['clean']:.0f}%" if "clean" in r else ""
        lines.append(f"| {r['model']} | {sampler} | {r.get('scheduler', '')} | {params} | {ms} | {100 * r['accuracy']:.1f}% | "
                     f"{worst} | {r['fd']:.2f} | {clean} |")
    return "\n".join(lines)


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--samplers", default="euler", help="comma-separated KSampler names (default euler)")
    p.add_argument("--steps", type=int, default=STEPS, help=f"sampling steps (default {STEPS})")
    p.add_argument("--models", help=f"comma-separated subset of {', '.join(SCHEDULERS)}")
    args = p.parse_args()
    mode = "quick" if args.quick else "full"
    per_digit = PER_DIGIT[mode]
    models = args.models.split(",") if args.models else None
    if models and set(models) - set(SCHEDULERS):
        p.error(f"unknown models {sorted(set(models) - set(SCHEDULERS))}; choose from {list(SCHEDULERS)}")
    host.boot()
    start = time.perf_counter()
    rows, classifier_accuracy = measure(per_digit, models, args.samplers.split(","), args.steps)
    print(f"\n## Quality of the demo models ({mode} run, {per_digit} images per digit, {args.samplers} "
          f"{args.steps} steps, cfg {CFG}, {time.perf_counter() - start:.0f} s)\n")
    print(table(rows))
    print(f"\nClassifier: an MLP on the latent, {100 * classifier_accuracy:.1f}% held-out accuracy on real digits. "
          "FD in its 64-d penultimate features against the held-out split; the first row is the floor "
          "(real digits, same count). Clean: as close to a training digit as "
          f"{100 * CLEAN_QUANTILE:.0f}% of real held-out digits are. ms / NFE: a batch of 10 images with its CFG "
          "pair, CPU, one thread.")
    write_json(args.json, {"per_digit": per_digit, "steps": args.steps, "cfg": CFG,
                           "classifier_held_out_accuracy": classifier_accuracy, "rows": rows})


if __name__ == "__main__":
    main()
