"""Guidance as a function of the noise level: CFG schedules and RAAG.

Scales are ComfyUI's cfg (1 = the conditional prediction alone; there the unconditional pass can be skipped).
Schedules take the progress p in [0, 1] through the model's noise range (0 = pure noise, 1 = clean), computed
from sigma by the caller, so they survive step-count changes and split sampling.
"""
import math

import torch

SCHEDULES = ("constant", "linear", "cosine", "clamp_linear", "interval", "custom")


def parse_points(text):
    """'p:scale, p:scale, ...' -> sorted [(p, scale)]; a scale may be 'cfg' (None here: the base scale, filled in
    by interpolate); a clear error for anything else."""
    points = []
    for item in (s.strip() for s in text.replace(";", ",").split(",")):
        if not item:
            continue
        try:
            where, scale = item.split(":")
            where, scale = float(where), None if scale.strip().lower() == "cfg" else float(scale)
        except ValueError:
            raise ValueError(f"Stride CFG schedule: custom point {item!r} is not 'position:scale' (e.g. '0:1, 0.3:7', "
                             "or '0.3:cfg' for the base scale)")
        if scale is None:
            if not math.isfinite(where):
                raise ValueError(f"Stride CFG schedule: custom point {item!r} needs a finite position")
        elif not (math.isfinite(where) and math.isfinite(scale)) or scale < 0:
            raise ValueError(f"Stride CFG schedule: custom point {item!r} needs finite values and a scale >= 0")
        points.append((where, scale))
    if not points:
        raise ValueError("Stride CFG schedule: the custom curve needs at least one 'position:scale' point")
    return sorted(points)


def interpolate(points, p, cfg=None):
    """Piecewise-linear through (position, scale) points, constant beyond the ends; a None scale is cfg."""
    if any(scale is None for _, scale in points):
        if cfg is None:
            raise ValueError("Stride CFG schedule: a custom point uses 'cfg' but no base scale is given")
        points = [(where, cfg if scale is None else scale) for where, scale in points]
    if p <= points[0][0]:
        return points[0][1]
    for (p0, s0), (p1, s1) in zip(points, points[1:]):
        if p <= p1:
            return s0 + (s1 - s0) * (p - p0) / (p1 - p0) if p1 > p0 else s1
    return points[-1][1]


def scheduled_scale(kind, p, cfg, start=0.0, end=1.0, floor=1.0, points=None):
    """The cfg at progress p for a schedule around the base scale cfg.

    Ramps follow Wang et al. 2024 (arXiv:2404.13040) in ComfyUI's convention (their w = cfg - 1), with the same
    mean over p in [0, 1] as the constant cfg (a schedule that never reaches p = 1, as flow schedules ending at
    sigma = 0 do, averages a little less): linear 1 + 2 (cfg - 1) p; cosine 1 + (cfg - 1)(1 - cos(pi p)); clamp_linear
    max(floor, linear). interval: cfg inside [start, end] of the progress (both ends included), 1 outside (Kynkaanniemi et al. 2024,
    arXiv:2404.07724). custom: `points` [(p, scale)] interpolated (a None scale: cfg)."""
    if kind == "constant":
        return cfg
    if kind == "linear":
        return 1 + 2 * (cfg - 1) * p
    if kind == "cosine":
        return 1 + (cfg - 1) * (1 - math.cos(math.pi * p))
    if kind == "clamp_linear":
        return max(floor, 1 + 2 * (cfg - 1) * p)
    if kind == "interval":
        return cfg if start <= p <= end else 1.0
    if kind == "custom":
        return interpolate(points, p, cfg)
    raise ValueError(f"Stride CFG schedule: unknown schedule {kind!r}; choose from {', '.join(SCHEDULES)}")


def raag_ratio(cond, uncond):
    """RAAG's RATIO per sample, with squared norms as the paper defines it: |cond - uncond|^2 / |uncond|^2."""
    delta = (cond - uncond).flatten(1).pow(2).sum(1)
    return delta / uncond.flatten(1).pow(2).sum(1).clamp_min(1e-24)


def raag_scale(cond, uncond, w_max, alpha):
    """RAAG (Zhu et al. 2025, arXiv:2508.03442): per sample w = 1 + (w_max - 1) exp(-alpha RATIO), RATIO =
    |cond - uncond|^2 / |uncond|^2. cond/uncond are the ODE slopes (or x - D, the same up to sigma)."""
    return 1 + (w_max - 1) * torch.exp(-alpha * raag_ratio(cond, uncond))


def guide(cond, uncond, scale):
    """uncond + scale (cond - uncond), with a per-sample [B] (or scalar) scale."""
    scale = torch.as_tensor(scale, dtype=cond.dtype, device=cond.device).reshape(-1, *([1] * (cond.ndim - 1)))
    return uncond + scale * (cond - uncond)
