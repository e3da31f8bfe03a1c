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


def retrieve(query, keys, values, neighbours=8, residual_scale=0.0, ridge=1e-6):
    """Per query row: the `neighbours` nearest keys (L2), weights w = argmin |sum_j w_j key_j - query|^2
    (+ ridge |w|^2 for near-duplicate keys), and sum_j w_j value_j + residual_scale (query - sum_j w_j key_j).
    Stride carries the part of the query the keys do not explain forward as the PF-ODE carries noise at high
    noise levels, scaled by sigma_v / sigma_k (in both parameterizations); ReDi itself drops it (scale 0)."""
    flat = query.double().flatten(1)
    n = min(neighbours, len(keys))
    out = []
    for q in flat:
        idx = torch.cdist(q[None], keys)[0].topk(n, largest=False).indices
        a = keys[idx].T                                                  # [D, n]
        gram = a.T @ a
        gram = gram + ridge * gram.diagonal().mean().clamp_min(1e-30) * torch.eye(n, dtype=gram.dtype)
        w = torch.linalg.solve(gram, a.T @ q)
        out.append(values[idx].T @ w + residual_scale * (q - a @ w))
    return torch.stack(out).reshape(query.shape).to(query.dtype)


def sample_redi(model, x, sigmas, extra_args=None, callback=None, disable=None, knowledge=None, key_step=2,
                value_step=5, neighbours=8, solver=None, **solver_options):
    """The first key_step steps with `solver`, retrieval to value_step, then `solver` on the rest of sigmas.
    knowledge = (keys, values) built with the same solver, schedule, cfg and latent size."""
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
    x = retrieve(x, keys, values, neighbours, float(sigmas[value_step] / sigmas[key_step]))
    return solver(model, x, sigmas[value_step:], extra_args, callback, disable, **solver_options)
