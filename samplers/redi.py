"""ReDi (Zhang et al. 2023, arXiv:2302.02285): trajectory retrieval. A knowledge base holds pairs of states of
the user's own sampling runs, a key at an early step k and a value at a later step v. A new run takes the first
k steps, finds the nearest keys, solves least squares for weights that combine them into its own state, applies
the weights to the values, and resumes at step v: the steps between k and v cost no model evaluation."""
import torch

from .core import check_sigmas


def build(solve, noises, sigmas, key_step, value_step):
    """(keys [M, D], values [M, D]) from the calibration noises: the key is the state after key_step steps of
    solve(x, sigmas_part), the value the state reached from it at value_step (what retrieval stands in for)."""
    if not 0 < key_step < value_step < len(sigmas) - 1:
        raise ValueError(f"Stride ReDi: need 0 < key step ({key_step}) < value step ({value_step}) < steps "
                         f"({len(sigmas) - 1})")
    keys = solve(noises, sigmas[:key_step + 1])
    values = solve(keys, sigmas[key_step:value_step + 1])
    return keys.double().flatten(1), values.double().flatten(1)


def retrieve(query, keys, values, neighbours=8, residual_scale=0.0, ridge=1e-6, stats=None):
    """Per query row: the `neighbours` nearest keys (L2), weights w = argmin |sum_j w_j key_j - query|^2
    (+ ridge |w|^2 for near-duplicate keys), and sum_j w_j value_j, ReDi's retrieved state. residual_scale > 0
    (Stride's addition, its node's default) adds residual_scale (query - sum_j w_j key_j): the part of the query
    the keys do not explain, carried forward as the PF-ODE carries noise at high noise levels. stats["explained"]: per row, the share
    1 - |query - sum_j w_j key_j|^2 / |query|^2 of the query the keys explain (near 0: retrieval is a guess)."""
    flat = query.double().flatten(1)
    n = min(neighbours, len(keys))
    out, explained = [], []
    for q in flat:
        idx = torch.cdist(q[None], keys)[0].topk(n, largest=False).indices
        a = keys[idx].T                                                  # [D, n]
        gram = a.T @ a
        gram = gram + ridge * gram.diagonal().mean().clamp_min(1e-30) * torch.eye(n, dtype=gram.dtype)
        w = torch.linalg.solve(gram, a.T @ q)
        rest = q - a @ w
        out.append(values[idx].T @ w + residual_scale * rest)
        explained.append(float(1 - rest.pow(2).sum() / q.pow(2).sum().clamp_min(1e-30)))
    if stats is not None:
        stats["explained"] = explained
    return torch.stack(out).reshape(query.shape).to(query.dtype)


def self_explained(keys, neighbours=8):
    """The mean share of each stored key its nearest other keys explain (leave-one-out): how well the knowledge
    base covers the states a run will bring to it."""
    shares = []
    for i in range(len(keys)):
        others = torch.cat([keys[:i], keys[i + 1:]])
        if len(others) == 0:
            return 0.0
        stats = {}
        retrieve(keys[i:i + 1], others, others, neighbours, stats=stats)
        shares += stats["explained"]
    return sum(shares) / len(shares)


def sample_redi(model, x, sigmas, extra_args=None, callback=None, disable=None, knowledge=None, key_step=2,
                value_step=5, neighbours=8, solver=None, residual_scale=0.0, stats=None, **solver_options):
    """The first key_step steps with `solver`, retrieval to value_step, then `solver` on the rest of sigmas.
    knowledge = (keys, values) built with the same solver, schedule, cfg and latent size. residual_scale: see
    retrieve (0, ReDi's own: the retrieved state alone)."""
    if knowledge is None:
        raise ValueError("Stride ReDi: no knowledge base; build one for this model first")
    check_sigmas(sigmas, "ReDi")
    steps = len(sigmas) - 1
    if not 0 < key_step < value_step < steps:
        raise ValueError(f"Stride ReDi: need 0 < key step ({key_step}) < value step ({value_step}) < steps ({steps})")
    keys, values = knowledge
    if keys.shape[1] != x[0].numel():
        raise ValueError(f"Stride ReDi: the knowledge base holds latents of {keys.shape[1]} values, this one has "
                         f"{x[0].numel()}; build one at this latent size")
    x = solver(model, x, sigmas[:key_step + 1], extra_args, callback, disable, **solver_options)
    x = retrieve(x, keys, values, neighbours, residual_scale, stats=stats)
    return solver(model, x, sigmas[value_step:], extra_args, callback, disable, **solver_options)
