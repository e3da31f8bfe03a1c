"""High-accuracy reference solve of the probability-flow ODE, to measure samplers against.

With a denoiser D(x, sigma) -> x0_hat and either parameterization ComfyUI uses
(x = x0 + sigma eps, or x = (1 - sigma) x0 + sigma eps), the PF-ODE is dx/dsigma = (x - D) / sigma;
in s = log(sigma) it reads dx/ds = x - D(x, e^s). We integrate it with the adaptive Dormand-Prince 5(4)
pair (Dormand & Prince 1980) in float64, then take the final denoise at sigma_end.
`sample_reference` wraps this as a sampler (k-diffusion signature) for networks with no analytic reference.
"""
import math

import torch

# Dormand-Prince 5(4) tableau (FSAL): nodes c, stages a, 5th-order weights b, embedded-error weights e.
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_B = _A[6] + (0.0,)
_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)


def solve_pf_ode(denoiser, x, sigma_start, sigma_end, rtol=1e-8, atol=1e-8, max_steps=100_000):
    """Integrate the PF-ODE from sigma_start to sigma_end (> 0); returns (x at sigma_end, steps taken).

    denoiser(x, sigma) takes a float64 batch and a python float. The step size is shared by the batch
    and controlled on the worst per-sample RMS error.
    """
    if not sigma_start > sigma_end > 0:
        raise ValueError(f"need sigma_start > sigma_end > 0, got {sigma_start} and {sigma_end}")
    x = x.to(torch.float64)
    s, s_end = math.log(sigma_start), math.log(sigma_end)
    f = lambda s_, x_: x_ - denoiser(x_, math.exp(s_))
    h = -min(0.05, s - s_end)
    k = [f(s, x)] + [None] * 6
    steps = 0
    while s > s_end:
        if steps >= max_steps:
            raise RuntimeError(f"reference solver did not reach sigma={sigma_end} in {max_steps} steps")
        h = max(h, s_end - s)
        for i in range(1, 7):
            x_i = x + h * sum(a * k[j] for j, a in enumerate(_A[i]) if a)
            k[i] = f(s + _C[i] * h, x_i)
        x_new = x_i  # the 7th stage point is the 5th-order solution (FSAL)
        err = h * sum(e * k[j] for j, e in enumerate(_E) if e)
        scale = atol + rtol * torch.maximum(x.abs(), x_new.abs())
        ratio = (err / scale).pow(2).flatten(1).mean(1).sqrt().max().item()
        if ratio <= 1.0:
            s, x, k[0] = (s_end if s + h <= s_end + 1e-12 else s + h), x_new, k[6]
            steps += 1
        h *= min(5.0, max(0.2, 0.9 * (ratio + 1e-16) ** -0.2))
    return x, steps


def reference_sample(denoiser, x, sigma_start, sigma_end, rtol=1e-8, atol=1e-8):
    """x_ref: the PF-ODE solved from sigma_start to sigma_end, then denoised at sigma_end."""
    x_end, _ = solve_pf_ode(denoiser, x, sigma_start, sigma_end, rtol, atol)
    return denoiser(x_end, sigma_end)


@torch.no_grad()
def sample_reference(model, x, sigmas, extra_args=None, callback=None, disable=None, rtol=1e-5, atol=1e-5):
    """k-diffusion-style sampler: the PF-ODE solved adaptively (float64 state) from sigmas[0] to the last
    nonzero sigma, then a final denoise if the schedule ends at 0. Only the endpoints of `sigmas` are used."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    dtype = x.dtype
    sigma_end = float(sigmas[-2] if sigmas[-1] == 0 else sigmas[-1])
    denoiser = lambda x_, sigma: model(x_.to(dtype), sigma * s_in, **extra_args).to(torch.float64)
    x_end, _ = solve_pf_ode(denoiser, x.to(torch.float64), float(sigmas[0]), sigma_end, rtol, atol)
    if sigmas[-1] == 0:
        x_end = denoiser(x_end, sigma_end)
    if callback is not None:
        callback({"x": x_end.to(dtype), "i": len(sigmas) - 2, "sigma": sigmas[-2], "sigma_hat": sigmas[-2],
                  "denoised": x_end.to(dtype)})
    return x_end.to(dtype)
