"""Train Stride's embedded models (nodes/neural_models.py SPECS) and the digit classifier of the benchmarks.

    .venv/bin/python -m demo.train [--only NAME]      (NAME: a model of SPECS, or `classifier`)

Reproducible: a fixed, seeded 80/20 split of scikit-learn's digits (`digits_split`), a fixed number of
iterations per model, seeded initialization, batches and noise. Each model is trained class-conditionally
(10% of labels dropped to the null label, for classifier-free guidance) through ComfyUI's own
`BaseModel.apply_model`, so training sees exactly the input scaling and timesteps that sampling uses:
- UNet (EPS): x = x0 + sigma eps, sigma uniform over the SD1.5 discrete schedule, loss |(x - x0_hat)/sigma - eps|^2;
- DiT (flow): x = (1 - sigma) x0 + sigma eps, sigma logit-normal, loss |(x - x0_hat)/sigma - (eps - x0)|^2.
AdamW with linear warmup and cosine decay, gradient clipping, and an EMA of the weights, which is what is
saved (fp16) to demo/weights/<name>.safetensors with the settings and losses in the metadata.
"""
import argparse
import math
import os
import time
from collections import namedtuple

import torch
from safetensors.torch import save_file

from .classifier import PATH as CLASSIFIER_PATH
from .classifier import DigitClassifier
from .digits import encode
from .oracle import GaussianMixture

SPLIT_SEED, HELD_OUT_SHARE = 0, 0.2
SEED = 0
COMMON = {"batch": 128, "warmup": 50, "final_lr_share": 0.1, "weight_decay": 0.01, "grad_clip": 1.0,
          "ema": 0.995, "cond_dropout": 0.1}


class MinSNR:
    """Min-SNR weighting of the EPS loss (Hang et al. 2023): min(SNR, gamma) / SNR = min(1, gamma sigma^2). The plain
    EPS loss spends most of its weight on low noise levels, and the UNets' samples kept salt-and-pepper noise."""

    def __init__(self, gamma):
        self.gamma = gamma

    def __call__(self, sigma):
        return (self.gamma * sigma.pow(2)).clamp(max=1.0)

    def __repr__(self):  # as written in the weights' metadata
        return f"min-SNR-{self.gamma:g}: min(1, {self.gamma:g} sigma^2) on the EPS loss"


# Iterations sized for minutes per model on a 2-core CPU; each weights file's metadata records its training seconds.
PLAN = {
    "unet_small": {"iterations": 1500, "lr": 2e-3, "weighting": MinSNR(5.0)},
    "unet_large": {"iterations": 650, "lr": 1e-3, "weighting": MinSNR(5.0)},
    "dit_small": {"iterations": 3000, "lr": 5e-4},
    "dit_large": {"iterations": 1500, "lr": 5e-4},
}
CLASSIFIER = {"iterations": 3000, "lr": 1e-3, "batch": 128, "weight_decay": 0.05, "dropout": 0.2,
              "latent_noise": 0.2}
Split = namedtuple("Split", "train_x train_y held_x held_y")


def digits_split():
    """The fixed split of scikit-learn's digits (stratified, seeded): normalized latents [N, 4, 8, 8] float32
    (the oracle's normalization, so every model shares one latent space) and labels [N] int64."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    data = load_digits()
    mixture = GaussianMixture.load()
    x = encode(torch.tensor(data.images), mixture.latent_mean, mixture.latent_std).float()
    y = torch.tensor(data.target, dtype=torch.int64)
    train, held = train_test_split(np.arange(len(y)), test_size=HELD_OUT_SHARE, random_state=SPLIT_SEED,
                                   stratify=data.target)
    train, held = torch.from_numpy(train), torch.from_numpy(held)
    return Split(x[train], y[train], x[held], y[held])


def learning_rate(step, iterations, lr, warmup, final_share):
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, iterations - warmup)
    return lr * (final_share + (1 - final_share) * 0.5 * (1 + math.cos(math.pi * progress)))


def diffusion_loss(model, embedding, family, x0, labels, gen, weighting=None):
    """Mean squared error of the model's noise (EPS) or velocity (flow) prediction, through apply_model;
    `weighting(sigma)`, if given, weighs each row (PLAN's UNets: MinSNR)."""
    n = x0.shape[0]
    eps = torch.randn(x0.shape, generator=gen)
    if family == "unet":
        sigmas = model.model_sampling.sigmas
        sigma = sigmas[torch.randint(len(sigmas), (n,), generator=gen)]
        s = sigma.view(-1, 1, 1, 1)
        x, target = x0 + s * eps, eps
    else:
        sigma = torch.sigmoid(torch.randn(n, generator=gen))
        s = sigma.view(-1, 1, 1, 1)
        x, target = (1 - s) * x0 + s * eps, eps - x0
    extra = {} if embedding.pooled is None else {"y": embedding.pooled(labels)}
    x0_hat = model.apply_model(x, sigma, c_crossattn=embedding.context(labels).unsqueeze(1),
                               transformer_options={}, **extra)
    err = ((x - x0_hat) / s - target).pow(2).mean(dim=(1, 2, 3))
    return err.mean() if weighting is None else (weighting(sigma) * err).mean()


def autograd_context(family):
    """ComfyUI's Flux blocks add in place into tensors autograd saved: save copies instead."""
    if family == "dit":
        return torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t)
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)


@torch.no_grad()
def held_out_loss(model, embedding, family, split, repeats=4):
    """The loss on the held-out digits with fixed noise (comparable between weights)."""
    gen = torch.Generator().manual_seed(1234)
    losses = [diffusion_loss(model, embedding, family, split.held_x, split.held_y, gen).item()
              for _ in range(repeats)]
    return sum(losses) / repeats


def train_model(nm, name, split):
    family = nm.SPECS[name]["family"]
    cfg = {**COMMON, **PLAN[name]}
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    model, embedding = nm.build_base_model(name), nm.label_embedding_for(name)
    nm.init_weights(model, embedding, SEED)
    model.train()
    params = list(model.diffusion_model.parameters()) + list(embedding.parameters())
    n_params = sum(p.numel() for p in model.diffusion_model.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    iterations, n_train = cfg["iterations"], split.train_x.shape[0]
    print(f"\n{name}: {n_params / 1e6:.2f} M parameters, {iterations} iterations, batch {cfg['batch']}, "
          f"lr {cfg['lr']}", flush=True)
    start, recent = time.perf_counter(), []
    for step in range(iterations):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, iterations, cfg["lr"], cfg["warmup"], cfg["final_lr_share"])
        idx = torch.randint(n_train, (cfg["batch"],), generator=gen)
        labels = split.train_y[idx].clone()
        labels[torch.rand(cfg["batch"], generator=gen) < cfg["cond_dropout"]] = nm.NULL_LABEL
        with autograd_context(family):
            loss = diffusion_loss(model, embedding, family, split.train_x[idx], labels, gen, cfg.get("weighting"))
            opt.zero_grad(set_to_none=True)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
        opt.step()
        decay = min(cfg["ema"], (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"{name}: the loss diverged at iteration {step}")
        recent = (recent + [loss.item()])[-max(1, iterations // 10):]
        if (step + 1) % max(1, iterations // 20) == 0 or step + 1 == iterations:
            elapsed = time.perf_counter() - start
            print(f"  {name} it {step + 1:5d}/{iterations}  loss {sum(recent) / len(recent):.4f}  "
                  f"{elapsed / (step + 1):.3f} s/it  {elapsed:5.0f} s  eta {elapsed / (step + 1) * (iterations - step - 1):4.0f} s",
                  flush=True)
    seconds = time.perf_counter() - start
    model.eval()
    raw_loss = held_out_loss(model, embedding, family, split)
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    ema_loss = held_out_loss(model, embedding, family, split)
    print(f"  {name}: {seconds:.0f} s, final training loss {sum(recent) / len(recent):.4f}, held-out loss "
          f"{raw_loss:.4f} (raw weights) / {ema_loss:.4f} (EMA, saved)", flush=True)
    shipped = nm.shipped_state(model.diffusion_model.state_dict())  # loadable on every supported ComfyUI
    tensors = {f"diffusion_model.{k}": v for k, v in shipped.items()}
    tensors.update({f"embedding.{k}": v for k, v in embedding.state_dict().items()})
    meta = {**{k: str(v) for k, v in cfg.items()}, "seed": str(SEED), "family": family,
            "parameters": str(n_params), "final_loss": f"{sum(recent) / len(recent):.5f}",
            "held_out_loss": f"{ema_loss:.5f}", "held_out_loss_raw_weights": f"{raw_loss:.5f}",
            "seconds": f"{seconds:.1f}", "split": f"digits_split(): stratified, seed {SPLIT_SEED}, "
            f"{1 - HELD_OUT_SHARE:.0%} train", "weights": "EMA, fp16"}
    save(tensors, nm.weights_path(name), meta)


def save(tensors, path, meta):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    save_file(half, path, metadata=meta)
    print(f"  wrote {path} ({os.path.getsize(path) / 1e6:.2f} MB)", flush=True)


def train_classifier(split):
    """The MLP judge, on the training split (with latent noise as augmentation); returns held-out accuracy."""
    cfg = CLASSIFIER
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    model = DigitClassifier(cfg["dropout"]).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    start = time.perf_counter()
    for step in range(cfg["iterations"]):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, cfg["iterations"], cfg["lr"], 50, 0.0)
        idx = torch.randint(split.train_x.shape[0], (cfg["batch"],), generator=gen)
        x = split.train_x[idx] + cfg["latent_noise"] * torch.randn(split.train_x[idx].shape, generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x), split.train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    train_acc = model.accuracy(split.train_x, split.train_y)
    held_acc = model.accuracy(split.held_x, split.held_y)
    seconds = time.perf_counter() - start
    print(f"\nclassifier: {seconds:.0f} s, accuracy {train_acc:.3f} train / {held_acc:.3f} held out", flush=True)
    meta = {**{k: str(v) for k, v in cfg.items()}, "seed": str(SEED), "train_accuracy": f"{train_acc:.4f}",
            "held_out_accuracy": f"{held_acc:.4f}", "seconds": f"{seconds:.1f}"}
    save(model.state_dict(), CLASSIFIER_PATH, meta)
    return held_acc


def main():
    from bench import host
    nm = host.stride("nodes.neural_models")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=[*PLAN, "classifier"], help="train one model (default: all, then the classifier)")
    args = p.parse_args()
    split = digits_split()
    print(f"digits split: {len(split.train_y)} train / {len(split.held_y)} held out; {torch.get_num_threads()} threads")
    start = time.perf_counter()
    for name in PLAN:
        if args.only in (None, name):
            train_model(nm, name, split)
    if args.only in (None, "classifier"):
        train_classifier(split)
    print(f"\ndone in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
