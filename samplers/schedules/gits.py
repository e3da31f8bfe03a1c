"""Optimal steps by dynamic programming over a teacher trajectory (GITS, Chen et al. 2024, arXiv:2405.11326;
BOSS, Nguyen et al. 2024): the cost of every one-step jump between grid points, then the cheapest path.

Jumps follow the solver the user runs, from the teacher's own states and denoiser outputs (no extra model
evaluations): 'euler' (= DDIM, first order), 'dpmpp_2m' (DPM-Solver++ 2M: its second point is the previous
node of the path, so costs are indexed by (previous, current, next) and the path search runs over pairs), and
'unipc' / 'unipc_bh1' (UniPC bh2 / bh1: the 2M-type UniP-2 predictor and the UniC corrector, which uses the
model output at the target: the teacher's there).
"""
import torch

from ..core import VE, History, per_sample
from ..multistep import dpmpp_update, unipc_update
from .common import mse, param_of

JUMPS = ("euler", "dpmpp_2m", "unipc", "unipc_bh1")


def _jump(kind, param, x_c, d_c, s, t, prev=None, d_target=None):
    """x at sigmas t ([R]) from the teacher's x_c, D_c at sigma s; prev = (D_p, sigma_p) for multistep jumps.
    A jump to sigma 0 is the final denoise, D_c."""
    s = per_sample(s, x_c)
    hist = History(2)
    if prev is not None:
        hist.push(prev[0], param.lam(per_sample(prev[1], x_c)))
    hist.push(d_c, param.lam(s))
    order = 2 if prev is not None and kind != "euler" else 1
    final = t == 0
    t = torch.where(final, s * 0.5, t)  # placeholder sigma on the final rows (their result is D_c)
    if not kind.startswith("unipc"):
        out = dpmpp_update(param, x_c, s, t, hist, order, d_c)
    else:
        out = unipc_update(param, x_c, s, t, hist, order, d_c, "bh1" if kind == "unipc_bh1" else "bh2", d_target)
    return torch.where(final.view(-1, *[1] * (out.ndim - 1)), d_c, out)


def l2(x, target):
    """The L2 norm of x - target per sample, over the latent ([B])."""
    return (x.double() - target.double()).flatten(1).norm(dim=1)


METRICS = ("l2", "mse")


def cost_tensor(xs, ds, grid, kind="euler", flow=False, half_log_snr=True, metric="l2"):
    """C[p, c, n]: the error of one jump from grid node c to node n against the teacher's state there, as GITS's
    reference code measures it: the L2 norm over the latent (not squared), averaged over the batch (metric
    "mse": Stride's earlier variant, the mean squared error, which weighs one large jump error more than two
    small ones and so spreads the error over the path);
    with node p as the previous point of a multistep jump (p = c: no previous point, the path's first jump).
    Node K (= len(grid)) is sigma 0, where the teacher's state is its output. Entries with n <= c are inf.
    half_log_snr=False steps flow models in -log sigma (ComfyUI's own dpmpp_2m / uni_pc do)."""
    if kind not in JUMPS:
        raise ValueError(f"Stride GITS: unknown jump {kind!r}; choose from {JUMPS}")
    if metric not in METRICS:
        raise ValueError(f"Stride GITS: unknown cost metric {metric!r}; choose from {METRICS}")
    measure = l2 if metric == "l2" else mse
    param = param_of(flow) if half_log_snr else VE
    sig = torch.cat([grid.double(), grid.new_zeros(1, dtype=torch.float64)])
    if flow and half_log_snr and float(sig[0]) >= 1.0:
        sig[0] = param.sigma_cap  # lambda is -inf at sigma 1 (the solvers cap it the same way)
    n_nodes = len(sig)
    cost = torch.full((n_nodes, n_nodes, n_nodes), float("inf"), dtype=torch.float64)
    batch = xs.shape[1]
    for c in range(n_nodes - 1):
        targets = torch.arange(c + 1, n_nodes)
        m = len(targets)
        x_c = xs[c].repeat(m, *[1] * (xs.ndim - 2))
        d_c = ds[c].repeat(m, *[1] * (xs.ndim - 2))
        t = sig[targets].repeat_interleave(batch)
        want = xs[targets].flatten(0, 1)
        d_t = torch.cat([ds, ds[-1:]])[targets].flatten(0, 1)  # node K's entry is unused (no corrector at 0)
        for p in ([c] if kind == "euler" or c == 0 else range(c)):
            prev = None if p == c else (ds[p].repeat(m, *[1] * (xs.ndim - 2)), sig[p])
            out = _jump(kind, param, x_c, d_c, sig[c], t, prev, d_t)
            err = measure(out, want).view(m, batch).mean(1)
            if kind == "euler":
                cost[:, c, targets] = err  # first-order jumps do not depend on the previous node
            else:
                cost[p, c, targets] = err
    return cost


def best_path(cost, steps, coeff=1.0):
    """The node path 0 -> K in exactly `steps` jumps minimising cost[first jump] + coeff * (cost of the rest),
    recursively (GITS's coefficient: coeff > 1 weighs the later, low-noise jumps more). Returns node indices."""
    n_nodes = cost.shape[0]
    last = n_nodes - 1
    if steps > last:
        raise ValueError(f"Stride GITS: {steps} steps need a teacher grid of at least {steps} points, "
                         f"it has {last}; raise the budget")
    # value[p, c]: the cheapest way to finish from node c (previous p) in k jumps; choice[k][p, c]: next node.
    value = cost[:, :, last].clone()
    value[:, last] = float("inf")
    choices = []
    for _ in range(steps - 1):
        # total[p, c, n] = cost[p, c, n] + coeff * value[c, n]; the last node is reached only by the final jump
        total = cost[:, :, :last] + coeff * value[None, :, :last]
        value, choice = total.min(dim=2)
        choices.append(choice)
    if not torch.isfinite(value[0, 0]):
        raise ValueError(f"Stride GITS: no path of {steps} jumps through the grid")
    path, prev = [0], 0
    for choice in reversed(choices):
        nxt = int(choice[prev, path[-1]])
        prev = path[-1]
        path.append(nxt)
    path.append(last)
    return path


def path_sigmas(grid, path):
    """The schedule (ending in 0) of a node path on the grid."""
    sig = torch.cat([grid.double(), grid.new_zeros(1, dtype=torch.float64)])
    return sig[path].float()
