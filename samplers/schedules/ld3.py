"""LD3-style learned times (Tong et al. 2025, arXiv:2405.15506): the solver's timesteps as a softmax-cumsum of
logits over the half-log-SNR range, fitted by gradient descent to the latent L2 error against a teacher's
output, with LD3's slack: the student may start from x'_T within a small ball around the teacher's noise.

Times only (no decoupled evaluation times): a SIGMAS list cannot carry them. Each model call is
gradient-checkpointed, so the backward pass keeps the per-step latents and one call's activations.
The times are N + 1 nodes from sigma_max to the model's sigma_min whose last becomes the final 0 (the
convention of the Align Your Steps tables: no model call is spent at sigma_min); a schedule that already ends at
sigma_min, as ComfyUI's do, is resampled to that convention before learning. The result is compared with the
user's own schedule on the calibration noises, and the better one is returned.
"""
import torch

from .common import BudgetExceeded, checkpoint_calls, mse, nodes_to_floor


def logits_from(init, sigma_min, param):
    """Logits theta [N+1] whose times reproduce the schedule `init` (N steps, ending in 0)."""
    lams = param.lam(_nodes(init, sigma_min, param))
    c = (lams - lams[0]) / (lams[-1] - lams[0])
    p = torch.diff(c).clamp_min(1e-6)
    return torch.log(torch.cat([p.mean().reshape(1), p]))


def sigmas_from(theta, init, sigma_min, param):
    """The schedule of logits theta: lambda_i = lambda_0 + c_i (lambda_N - lambda_0), c the min-max normalised
    cumulative softmax; the first sigma is init's, the last node (sigma_min) becomes the final 0."""
    ends = param.lam(_nodes(init, sigma_min, param)[[0, -1]])
    c = torch.cumsum(torch.softmax(theta, 0), 0)
    c = (c - c[0]) / (c[-1] - c[0])
    sig = param.sigma_of(ends[0] + c * (ends[1] - ends[0]))
    return torch.cat([init[:1].to(sig), sig[1:-1], sig.new_zeros(1)])


def _nodes(init, sigma_min, param):
    return param.capped(nodes_to_floor(init, sigma_min))


def optimize(denoiser, solve, x, target, init, sigma_min, param, lr=5e-3, slack=1e-3, max_iters=10_000):
    """Fit the times of `init` (N steps, ending in 0) so that solve(model, x', sigmas) matches target.

    denoiser: D(x, sigma) (a Counted, whose budget ends the fit: an iteration costs 4 evaluations per model call,
    the forward call and its checkpoint recomputation, both counted by the denoiser, and 2 charged for the backward
    pass; 2 runs at the end compare the result with init); solve: a differentiable Stride sampler. The slack
    radius is LD3's r = slack * d / N^2 (d: latent size per sample).
    Returns (sigmas, their loss, init's loss, iterations): losses on the calibration noises themselves."""
    steps = len(init) - 1
    theta = torch.nn.Parameter(logits_from(init, sigma_min, param))
    opt = torch.optim.RMSprop([theta], lr=lr, momentum=0.9)
    radius = slack * x[0].numel() / steps ** 2
    x_t, prev_loss = x.detach().clone(), None
    model = checkpoint_calls(denoiser)
    best, iters = None, 0
    with torch.enable_grad():
        while iters < max_iters:
            if denoiser.budget is not None and denoiser.calls + 6 * steps > denoiser.budget + 1e-9:
                if iters < 2:
                    raise BudgetExceeded(f"LD3 needs two iterations of {4 * steps} model evaluations and "
                                         f"{2 * steps} to check the result; the budget is {denoiser.budget:g}")
                break
            x_var = x_t.clone().requires_grad_(True)
            sigmas = sigmas_from(theta, init, sigma_min, param)
            losses = mse(solve(model, x_var, sigmas), target)
            denoiser.charge(2 * steps)  # the backward pass through every model call
            loss = losses.mean()
            value = loss.item()
            if best is None or value < best[1]:
                best = (sigmas.detach().float(), value)
            if prev_loss is not None:  # keep a sample's moved noise only where its loss went down
                worse = losses.detach() > prev_loss
                x_t[worse] = x_prev[worse]
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_([theta], 1.0)
            opt.step()
            x_prev, prev_loss = x_t.clone(), losses.detach()
            with torch.no_grad():  # SGD on x'_T, projected back onto the ball around the teacher's noise
                moved = x_t - (12.0 / steps) * x_var.grad
                delta = moved - x
                norm = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
                x_t = x + delta * (radius / norm).clamp(max=1.0).reshape(-1, *[1] * (x.ndim - 1))
            iters += 1
    with torch.no_grad():  # the slack moved the noise: judge the result, and init, on the noise itself
        loss = mse(solve(denoiser, x, best[0].to(init.dtype)), target).mean().item()
        start = mse(solve(denoiser, x, init), target).mean().item()
    return (best[0], loss, start, iters) if loss < start else (init.float(), start, start, iters)
