"""Bottleneck Sampling (Tian et al. 2025, arXiv:2503.18940): a high -> low -> high resolution stage ramp.

Stage k runs at latent scale scales[k] of the input's H, W (the last two dimensions; a video latent keeps its
frames). Between stages the clean estimate x0_hat is resized (anti-aliased) and re-noised with the model's own
interpolant x = alpha(sigma_k) x0_hat + sigma_k eps at the stage's start level sigma_k.

Levels are written in the flow-equivalent time t = sigma / (1 + sigma) (VE / EPS models) or t = sigma (flow),
normalized by the user's first level: u = t / t(sigmas[0]). Noise-reintroduction strength w_k is the stage's start
u: a flow schedule from sigma = 1 restarts at sigma_k = w_k, a VE one at the sigma whose t is w_k t(sigma_max).
"""
import functools

import torch
import torch.nn.functional as F

from .core import VE, check_sigmas
from .multistep import sample_ddim


def flow_time(sigma, param):
    """t = sigma (flow) or sigma / (1 + sigma) (VE: the VE-ised flow-equivalent time)."""
    return sigma if param.flow else sigma / (1.0 + sigma)


def sigma_of_time(t, param):
    return t if param.flow else t / (1.0 - t)


def time_shift(r, shift):
    """The SD3 / Flux time shift r' = s r / (1 + (s - 1) r); fixes 0 and 1, s > 1 moves steps to high noise."""
    return r if shift == 1.0 else shift * r / (1.0 + (shift - 1.0) * r)


def split_steps(n, fractions):
    """n steps split by fractions: rounded, each stage >= 1, summing to n (largest remainders settle the rest)."""
    raw = [f / sum(fractions) * n for f in fractions]
    steps = [max(1, round(r)) for r in raw]
    while sum(steps) > n:
        k = max((k for k in range(len(steps)) if steps[k] > 1), key=lambda k: steps[k] - raw[k])
        steps[k] -= 1
    while sum(steps) < n:
        steps[min(range(len(steps)), key=lambda k: steps[k] - raw[k])] += 1
    return steps


def resize(x, size):
    """Resize the last two dimensions of x to size = (h, w), anti-aliased: shrinking averages areas (box filter;
    exactly 2x2 / 4x4 ... average pooling for integer factors), growing is bicubic (align_corners=False, pixel
    centres kept). The same size returns x itself."""
    h, w = size
    H, W = x.shape[-2:]
    if (h, w) == (H, W):
        return x
    y = x.reshape(1, -1, H, W).float() if x.dtype in (torch.float16, torch.bfloat16) else x.reshape(1, -1, H, W)
    if h < H or w < W:
        y = F.interpolate(y, size=(min(h, H), min(w, W)), mode="area")
    if h > y.shape[-2] or w > y.shape[-1]:
        y = F.interpolate(y, size=(h, w), mode="bicubic", align_corners=False)
    return y.reshape(*x.shape[:-2], h, w).to(x.dtype)


def stage_sizes(shape, scales, multiple):
    """(h, w) of each stage; a scale below 1 must give integer sizes divisible by `multiple` (the patch size).
    Image latents [B, C, H, W] only: video latents and ComfyUI's packed audio+video latents [B, 1, N] are refused."""
    if len(shape) != 4:
        raise ValueError(f"Stride bottleneck: resizes image latents [batch, channels, height, width]; this latent has "
                         f"shape {tuple(shape)} (a video latent, or audio+video packed flat), which it cannot resize; "
                         "use another Stride sampler for this model")
    H, W = shape[-2:]
    sizes = []
    for k, s in enumerate(scales):
        h, w = H * s, W * s
        if s < 1.0 and (abs(h - round(h)) > 1e-6 or abs(w - round(w)) > 1e-6
                        or round(h) % multiple or round(w) % multiple):
            raise ValueError(f"Stride bottleneck: stage {k} at scale {s} turns the latent's {H}x{W} into {h:g}x{w:g}; "
                             f"every stage needs whole sizes divisible by {multiple} (choose a latent size or scale "
                             f"so that H*scale and W*scale are multiples of {multiple})")
        sizes.append((round(h), round(w)))
    return sizes


def check_options(n, scales, fractions, strengths, shifts):
    k = len(scales)
    if not k or not len(fractions) == len(strengths) == len(shifts) == k:
        raise ValueError(f"Stride bottleneck: scales, fractions, strengths and shifts need one value per stage and the "
                         f"same length, got {len(scales)}, {len(fractions)}, {len(strengths)}, {len(shifts)}")
    if not all(0.0 < s <= 1.0 for s in scales) or scales[-1] != 1.0:
        raise ValueError(f"Stride bottleneck: scales must lie in (0, 1] and end with 1.0 (the output has the "
                         f"input's size), got {tuple(scales)}")
    if not all(f > 0 for f in fractions):
        raise ValueError(f"Stride bottleneck: fractions must be > 0, got {tuple(fractions)}")
    if not all(0.0 < w <= 1.0 for w in strengths) or strengths[0] != 1.0:
        raise ValueError(f"Stride bottleneck: strengths must lie in (0, 1], and the first is 1 (stage 0 starts from "
                         f"the input noise), got {tuple(strengths)}")
    if not all(s > 0 for s in shifts):
        raise ValueError(f"Stride bottleneck: shifts must be > 0, got {tuple(shifts)}")
    if n < k:
        raise ValueError(f"Stride bottleneck: {k} stages need at least {k} steps, got {n}")


def stage_schedules(sigmas, steps, strengths, shifts, param):
    """The sigma list of every stage. Stage 0 is the user's sigmas (time-shifted when shifts[0] != 1, endpoints
    kept); when other stages follow, it takes their first steps[0] levels and then 0: its last step is a final
    denoise that hands x0_hat over. Stage k >= 1 has steps[k] levels from u = w_k to the user's last nonzero level,
    uniform in r then shifted (u = u_end + (w_k - u_end) shift(r), r from 1 to 0), then 0; the last stage ends
    where the user's sigmas end (at 0, or at a nonzero last sigma without a final denoise)."""
    s64 = sigmas.detach().to(torch.float64).cpu()
    t0 = float(flow_time(s64[0], param))
    t_end = float(flow_time(s64[s64 > 0][-1], param))
    last = len(steps) - 1
    out = []
    for k, n in enumerate(steps):
        if k == 0:
            t = flow_time(s64, param)
            if shifts[0] != 1.0 and t0 > t_end:
                r = time_shift(((t - t_end) / (t0 - t_end)).clamp(min=0), shifts[0])
                t = torch.where(s64 > 0, t_end + (t0 - t_end) * r, t)
                stage = torch.cat([s64[:1], sigma_of_time(t[1:], param)])  # the first level stays exact
            else:
                stage = sigmas
            out.append(stage if k == last else torch.cat([stage[:n], stage.new_zeros(1)]))
            continue
        t_start = strengths[k] * t0
        if not t_start > t_end:
            raise ValueError(f"Stride bottleneck: stage {k} would restart at sigma "
                             f"{float(sigma_of_time(torch.tensor(t_start), param)):.4g}, not above the schedule's last "
                             f"sigma {float(s64[s64 > 0][-1]):.4g}; raise strengths[{k}]")
        open_end = k == last and bool(s64[-1] > 0)
        r = time_shift(torch.linspace(1.0, 0.0, n + 1 if open_end else n, dtype=torch.float64), shifts[k])
        levels = sigma_of_time(t_end + (t_start - t_end) * r, param)
        out.append(levels if open_end else torch.cat([levels, levels.new_zeros(1)]))
    return [s.to(sigmas.dtype).to(sigmas.device) for s in out]


def stage_noise(noise_sampler, sigma, sigma_next, like):
    """Unit Gaussian noise shaped like `like`. noise_sampler(sigma, sigma_next) (ComfyUI's, seeded from the run)
    gives noise of the full-resolution input's shape; a smaller stage takes its top-left crop (a crop of iid
    Gaussians is iid Gaussian). Without a noise sampler: torch.randn (the global generator)."""
    if noise_sampler is None:
        return torch.randn_like(like)
    eps = noise_sampler(sigma, sigma_next)
    if eps.shape == like.shape:
        return eps.to(like.dtype)
    h, w = like.shape[-2:]
    if eps.shape[:-2] != like.shape[:-2] or eps.shape[-2] < h or eps.shape[-1] < w:
        raise ValueError(f"Stride bottleneck: the noise sampler gives {tuple(eps.shape)}, not enough for a stage of "
                         f"{tuple(like.shape)}")
    return eps[..., :h, :w].to(like.dtype)


def full_res_callback(callback, offset, size):
    """A stage's callback for the run's: i counted over all stages, x and denoised at full resolution."""
    if callback is None:
        return None
    return lambda d: callback(dict(d, i=d["i"] + offset, x=resize(d["x"], size), denoised=resize(d["denoised"], size)))


def sample_bottleneck(model, x, sigmas, extra_args=None, callback=None, disable=None, param=VE,
                      scales=(1.0, 0.5, 1.0), fractions=(0.2, 0.55, 0.25), strengths=(1.0, 0.8, 0.6),
                      shifts=(1.0, 1.0, 1.0), noise_sampler=None, solver=None, multiple=2, stats=None):
    """Bottleneck Sampling (Tian et al. 2025, arXiv:2503.18940): stages at latent scales `scales`, high -> low -> high.

    The N = len(sigmas) - 1 steps are split by `fractions` (split_steps); stage_schedules gives each stage's sigmas
    (stage 0 follows the user's sigmas; stage k >= 1 restarts at strength strengths[k] with time shift shifts[k]).
    Every stage but the last ends with a final denoise, whose x0_hat is resized to the next stage's size (resize:
    area down, bicubic up) and re-noised with the model's interpolant x = alpha(sigma_k) x0_hat + sigma_k eps,
    eps from noise_sampler(sigma_k, next level) (stage_noise). The model is called at each stage's size.

    solver: a Stride sampler called as solver(model, x, stage_sigmas, extra_args, stage_callback, disable) (bind
    its options, param included, with functools.partial); default sample_ddim with `param`, which costs one model
    call per step, so N calls in all. `param` also sets the re-noising interpolant.
    callback: full resolution only, with i counting over all N steps; a smaller stage's x and denoised are
    upsampled for it (resize). stats (a dict): filled with steps, sizes, start_sigmas, schedules and pixel_steps =
    sum_k steps_k scales_k^2 / N (the fraction of a plain run's per-pixel compute; attention costs grow faster).
    """
    check_sigmas(sigmas, "bottleneck")
    n = len(sigmas) - 1
    check_options(n, scales, fractions, strengths, shifts)
    sizes = stage_sizes(x.shape, scales, multiple)
    steps = split_steps(n, fractions)
    schedules = stage_schedules(sigmas, steps, strengths, shifts, param)
    solver = solver or functools.partial(sample_ddim, param=param)
    full = tuple(x.shape[-2:])
    if stats is not None:
        stats.update(steps=steps, sizes=sizes, start_sigmas=[float(s[0]) for s in schedules],
                     schedules=[s.tolist() for s in schedules],
                     pixel_steps=sum(nk * s * s for nk, s in zip(steps, scales)) / n)
    offset = 0
    for k, stage_sigmas in enumerate(schedules):
        if k > 0:
            x0 = resize(x, sizes[k])
            sigma_k = stage_sigmas[0]
            eps = stage_noise(noise_sampler, sigma_k, stage_sigmas[1], x0)
            x = param.alpha(sigma_k).to(x0.dtype) * x0 + sigma_k.to(x0.dtype) * eps
        x = solver(model, x, stage_sigmas, extra_args, full_res_callback(callback, offset, full), disable)
        offset += steps[k]
    return x
