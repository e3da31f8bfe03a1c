"""Evolutionary timestep search (AutoDiffusion, Li et al. 2023, arXiv:2309.10438), with the error of the
solver's output against a teacher as fitness: the brute-force baseline the other optimizers must beat at
equal calibration budget. A genome is the N-1 sigmas between the first one and the final 0, drawn from a
fine log-spaced candidate grid."""
import torch

from .common import BudgetExceeded, log_grid


def search(fitness, init, sigma_min, flow=False, grid_size=200, population=16, top=5, mutation=0.2, seed=0):
    """Evolve schedules of len(init) - 1 steps: fitness(sigmas ending in 0) -> error (lower is better), each
    call running the solver (so the denoiser's budget bounds the search: BudgetExceeded ends it after the
    first generation). Each generation keeps the `top` best, adds mutants (each gene moved to a random unused
    grid point with probability `mutation`), uniform crossovers of the top, and random genomes.
    Returns (best sigmas, its error, the initial schedule's error, genomes evaluated)."""
    gen = torch.Generator().manual_seed(seed)
    n_genes = len(init) - 2
    grid = log_grid(float(init[0]), sigma_min, grid_size + 1, flow)[1:]  # below the first sigma
    if n_genes > len(grid):
        raise ValueError(f"Stride evolution: {len(init) - 1} steps need a candidate grid of more points")
    seen = {}

    def sigmas_of(genome):
        return torch.cat([init[:1].double(), grid[list(genome)], torch.zeros(1, dtype=torch.float64)]).float()

    def score(genome):
        if genome not in seen:
            seen[genome] = float(fitness(sigmas_of(genome)))
        return seen[genome]

    def random_genome():
        return tuple(sorted(torch.randperm(len(grid), generator=gen)[:n_genes].tolist()))

    def mutate(genome):
        genes = set(genome)
        for g in genome:
            if torch.rand((), generator=gen) < mutation:
                free = [i for i in range(len(grid)) if i not in genes]
                genes.discard(g)
                genes.add(free[int(torch.randint(len(free), (), generator=gen))])
        return tuple(sorted(genes))

    def crossover(a, b):
        pick = torch.rand(n_genes, generator=gen) < 0.5
        genes = {x if p else y for x, y, p in zip(a, b, pick.tolist())}
        for g in a + b + random_genome():  # collisions: fill from the parents, then at random
            if len(genes) == n_genes:
                break
            genes.add(g)
        return tuple(sorted(genes))

    start = _start(init, grid, n_genes)
    initial = score(start)
    pool = [start] + [mutate(start) for _ in range(population // 2)]
    pool += [random_genome() for _ in range(population - len(pool))]
    generations = 0
    try:
        while True:
            tried = len(seen)
            ranked = sorted(set(pool), key=score)
            generations += 1
            if generations > 1 and len(seen) == tried:
                break  # a generation with nothing new: the grid is exhausted (small grids, few steps)
            parents = ranked[:top]
            pool = parents + [mutate(parents[int(torch.randint(len(parents), (), generator=gen))])
                              for _ in range(population // 2)]
            pool += [crossover(*[parents[int(i)] for i in torch.randint(len(parents), (2,), generator=gen)])
                     for _ in range(population // 4)]
            pool += [random_genome() for _ in range(population - len(pool))]
    except BudgetExceeded:
        if generations == 0:
            raise
    best = min(seen, key=seen.get)
    return sigmas_of(best), seen[best], initial, len(seen)


def _start(init, grid, n_genes):
    """The initial schedule snapped to the grid (nearest in log sigma), padded to n distinct genes."""
    logs = grid.log()
    genes = {int((logs - torch.log(torch.tensor(float(s), dtype=torch.float64))).abs().argmin()) for s in init[1:-1]}
    for i in range(len(grid)):
        if len(genes) >= n_genes:
            break
        genes.add(i)
    return tuple(sorted(genes))[:n_genes]
