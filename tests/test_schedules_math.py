"""The schedule optimizers (samplers/schedules/) on plain tensors: parity with ComfyUI's Align Your Steps
interpolation and denoise slicing, the shareable schedule text, the GITS dynamic program against brute force,
its jump costs against hand-written solver steps, quality on the exact oracle (GITS, AYS's KLUB, LD3, the
evolutionary search) against the teacher and the adaptive reference, budgets, and differentiability of the
multistep samplers in their sigmas."""
import itertools
import json
import math
import signal

import pytest
import torch

import comfy.k_diffusion.sampling as K
from comfy_extras.nodes_align_your_steps import NOISE_LEVELS, AlignYourStepsScheduler, loglinear_interp

LABELS = torch.tensor([0, 3, 7, 9, 1, 2, 5, 8])
EPS_RANGE = (0.0292, 14.6)   # (sigma_min, sigma_max) of the EPS oracle's schedule
FLOW_RANGE = (0.01, 1.0)


@pytest.fixture(scope="module")
def m(stride, guided_oracle):
    class Modules:
        guided = staticmethod(guided_oracle)
        core = stride("samplers.core")
        multistep = stride("samplers.multistep")
        reference = stride("samplers.reference")
        common = stride("samplers.schedules.common")
        gits = stride("samplers.schedules.gits")
        ays = stride("samplers.schedules.ays")
        ld3 = stride("samplers.schedules.ld3")
        evolution = stride("samplers.schedules.evolution")
        mixture = stride("nodes.oracle_model").load_mixture()
    return Modules


def oracle(m, flow, cfg, batch=4):
    """The exact guided oracle (float64) in the VE or flow parameterization. Row r carries the label of sample
    r % batch (the optimizers stack several copies of a calibration batch of `batch` samples)."""
    return m.guided(flow, LABELS[:batch], cfg)


def noise(batch, seed):
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def start(batch, seed, flow):
    return noise(batch, seed) * (1.0 if flow else EPS_RANGE[1])


def param(m, flow):
    return m.core.FLOW if flow else m.core.VE


def zero_end(sigmas):
    return torch.cat([sigmas.double(), torch.zeros(1, dtype=torch.float64)])


def floor_schedule(m, steps, flow):
    """An N-step schedule in the Align Your Steps convention: the N + 1 nodes uniform in lambda from sigma_max to
    sigma_min, the last replaced by 0 (the final denoise happens above sigma_min)."""
    smin, smax = FLOW_RANGE if flow else EPS_RANGE
    return zero_end(m.common.log_grid(smax, smin, steps + 1, flow)[:-1]).float()


def log_uniform(m, steps, flow):
    """N sigmas uniform in lambda from sigma_max down to sigma_min, then 0 (N steps)."""
    smin, smax = FLOW_RANGE if flow else EPS_RANGE
    return zero_end(m.common.log_grid(smax, smin, steps, flow))


# --- common: resampling, denoise slicing, schedule text, ranges, budgets -------------------------------------------

@pytest.mark.parametrize("model_type", list(NOISE_LEVELS))
def test_resample_is_comfyui_align_your_steps_interpolation(m, model_type):
    """ComfyUI's AYS node interpolates its 11-value table (ending at sigma_min) to steps + 1 values and sets the
    last to 0. The table followed by 0 is a Stride schedule whose nonzero part is the whole table, so ComfyUI's
    result is resample(table + [0], steps + 1) with its last nonzero sigma replaced by the final 0."""
    table = NOISE_LEVELS[model_type]
    for steps in (3, 7, 10, 16, 30, 100):
        comfy = AlignYourStepsScheduler.execute(model_type, steps, 1.0).result[0]
        ours = m.common.resample(torch.tensor(table + [0.0], dtype=torch.float64), steps + 1)
        assert len(ours) == steps + 2 and ours.dtype == torch.float32
        torch.testing.assert_close(torch.cat([ours[:steps], ours[-1:]]), comfy, rtol=2e-7, atol=0)
        direct = torch.from_numpy(loglinear_interp(table, steps)).float()
        torch.testing.assert_close(m.common.resample(torch.tensor(table, dtype=torch.float64), steps)[:-1], direct,
                                   rtol=2e-7, atol=0)


def test_resample_identity_endpoints_monotone_and_geometric_invariance(m):
    gen = torch.Generator().manual_seed(3)
    sched = zero_end(torch.sort(torch.rand(7, generator=gen, dtype=torch.float64) * 14 + 0.03, descending=True)[0])
    sched = sched.float()
    assert torch.equal(m.common.resample(sched, 7), sched)           # same step count: the schedule itself
    for steps in (2, 3, 5, 12, 40):
        out = m.common.resample(sched, steps)
        assert len(out) == steps + 1 and out[-1] == 0
        torch.testing.assert_close(out[[0, -2]], sched[[0, -2]], rtol=1e-7, atol=0)  # endpoints kept
        assert bool((out[1:] < out[:-1]).all())                      # strictly decreasing
    # A geometric schedule (uniform in log sigma) resamples to the geometric schedule of the other length.
    geo = lambda n: zero_end(torch.exp(torch.linspace(math.log(14.6), math.log(0.03), n, dtype=torch.float64)))
    for steps in (4, 9, 25):
        torch.testing.assert_close(m.common.resample(geo(6), steps).double(), geo(steps), rtol=1e-6, atol=0)
    # A schedule not ending in 0 is all nonzero part.
    torch.testing.assert_close(m.common.resample(geo(6)[:-1], 6), geo(6).float(), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="one-step"):
        m.common.resample(torch.tensor([5.0, 0.0]), 3)
    for bad in (0, 2.5, -1):
        with pytest.raises(ValueError, match="steps"):
            m.common.resample(sched, bad)


@pytest.mark.parametrize("model_type", ["SD1", "SDXL"])
def test_with_denoise_is_comfyui_align_your_steps_slicing(m, model_type):
    """with_denoise keeps the last round(steps * denoise) steps, as ComfyUI's AYS node does. (Where that rounds to
    0 steps with denoise > 0, ComfyUI returns [0.] and Stride an empty tensor: both mean "no sampling".)"""
    for steps in (7, 10, 25):
        full = AlignYourStepsScheduler.execute(model_type, steps, 1.0).result[0]
        for denoise in (1.0, 0.9, 0.75, 0.5, 0.33, 0.15):
            if round(steps * denoise) == 0:
                continue
            theirs = AlignYourStepsScheduler.execute(model_type, steps, denoise).result[0]
            assert torch.equal(m.common.with_denoise(full, denoise), theirs), (steps, denoise)
        assert len(m.common.with_denoise(full, 0.0)) == 0 == len(AlignYourStepsScheduler.execute(model_type, steps,
                                                                                               0.0).result[0])
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="denoise"):
            m.common.with_denoise(full, bad)


def test_schedule_text_round_trips_float32_bit_for_bit(m):
    gen = torch.Generator().manual_seed(1)
    values = torch.sort(torch.rand(9, generator=gen) * 14.6, descending=True)[0]
    tricky = torch.tensor([14.6146412293, 1 / 3, 0.1, 0.0291671582, 1e-3], dtype=torch.float64)
    for sched in (zero_end(values).float(), zero_end(tricky), zero_end(tricky).float()):
        text = m.common.schedule_text(sched, model="abc123", steps=len(sched) - 1, solver="dpmpp_2m")
        assert "\n" not in text and json.loads(text)["stride_schedule"] == m.common.TEXT_VERSION
        sigmas, meta = m.common.parse_schedule_text("  " + text + "\n")
        assert sigmas.dtype == torch.float32
        assert torch.equal(sigmas, sched.float())  # bit for bit
        assert meta["model"] == "abc123" and meta["steps"] == len(sched) - 1 and meta["solver"] == "dpmpp_2m"
        assert "sigmas" not in meta


def test_parse_schedule_text_accepts_a_plain_comma_list(m):
    for text in ("14.61, 3.86, 1.39, 0.39, 0", "[14.61, 3.86, 1.39, 0.39, 0]", "\n14.61,3.86 ,1.39,0.39,0.0\n"):
        sigmas, meta = m.common.parse_schedule_text(text)
        assert torch.equal(sigmas, torch.tensor([14.61, 3.86, 1.39, 0.39, 0.0], dtype=torch.float32)) and meta == {}


@pytest.mark.parametrize("text,message", [
    ("", "empty"),
    ("  \n ", "empty"),
    ("{not json", "not valid JSON"),
    ('{"stride_schedule": 2, "sigmas": [1.0, 0.0]}', "not a Stride schedule text"),
    ('{"stride_schedule": 1}', "not a Stride schedule text"),
    ('{"stride_schedule": 1, "sigmas": ["a", 0]}', "must be numbers"),
    ("1.0, x, 0", "must be numbers"),
    ("1.0, 1.0, 0", "decrease strictly"),
    ("0.5, 1.0, 0", "decrease strictly"),
    ("1.0, nan, 0", "finite"),
    ("1.0, 0.5", "end in 0"),
    ("0", "at least two"),
])
def test_parse_schedule_text_errors(m, text, message):
    with pytest.raises(ValueError, match=message):
        m.common.parse_schedule_text(text)


def test_check_range(m):
    sched = torch.tensor([14.6, 3.0, 0.5, 0.0292, 0.0])
    m.common.check_range(sched, 0.0292, 14.6, "t")                   # the final 0 is not below sigma_min
    m.common.check_range(sched * torch.tensor([1 + 5e-5, 1, 1, 1, 1]), 0.0292, 14.6, "t")  # within 1e-4 sigma_max
    with pytest.raises(ValueError, match="leave the model's range"):
        m.common.check_range(sched, 0.0292, 10.0, "t")
    with pytest.raises(ValueError, match="leave the model's range"):
        m.common.check_range(sched, 0.05, 14.6, "t")
    with pytest.raises(ValueError, match="decrease strictly"):
        m.common.check_range(torch.tensor([1.0, 2.0, 0.0]), 0.0292, 14.6, "t")


def test_counted_counts_batch_fractions_and_stops_before_the_budget(m):
    seen, progress = [], []
    inner = lambda x, sigma, **_: seen.append(x.shape[0]) or x * 0
    counted = m.common.Counted(inner, batch=4, budget=5, progress=lambda done, total: progress.append((done, total)))
    for rows in (4, 8, 2):
        counted(torch.zeros(rows, 3), torch.ones(rows))
    assert counted.calls == 3.5 and progress == [(1.0, 5), (3.0, 5), (3.5, 5)]
    with pytest.raises(m.common.BudgetExceeded):
        counted(torch.zeros(8, 3), torch.ones(8))                    # 5.5 > 5: refused before the model runs
    assert counted.calls == 3.5 and seen == [4, 8, 2]
    counted(torch.zeros(6, 3), torch.ones(6))                        # exactly the budget
    assert counted.calls == 5.0
    with pytest.raises(m.common.BudgetExceeded):
        counted.charge(0.01)
    assert counted.calls == 5.0 and issubclass(m.common.BudgetExceeded, RuntimeError)
    free = m.common.Counted(inner, batch=2)
    for _ in range(50):
        free(torch.zeros(4, 3), torch.ones(4))
    assert free.calls == 100.0


def test_log_grid_and_nodes_to_floor(m):
    for flow in (False, True):
        smin, smax = FLOW_RANGE if flow else EPS_RANGE
        p = param(m, flow)
        grid = m.common.log_grid(smax, smin, 9, flow)
        # (log_grid computes in float32: torch.linspace without a dtype; hence the float32 tolerances)
        assert grid[0].item() == pytest.approx(smax, rel=1e-7) and grid[-1].item() == pytest.approx(smin, rel=1e-7)
        steps = torch.diff(p.lam(p.capped(grid.double())))  # uniform in lambda (float32 sigmas near flow's 1: 1e-3)
        torch.testing.assert_close(steps, steps.mean().expand(8), rtol=0, atol=1e-3 if flow else 1e-5)
    floor = floor_schedule(m, 5, False)
    nodes = m.common.nodes_to_floor(floor, EPS_RANGE[0])               # above sigma_min: sigma_min appended
    torch.testing.assert_close(nodes, m.common.log_grid(EPS_RANGE[1], EPS_RANGE[0], 6).double(), rtol=1e-6, atol=0)
    ends = log_uniform(m, 5, False).float()                            # ends at sigma_min: resampled to 6 nodes
    nodes = m.common.nodes_to_floor(ends, EPS_RANGE[0])
    assert len(nodes) == 6 and nodes[-1].item() == EPS_RANGE[0] and bool((torch.diff(nodes) < 0).all())


# --- GITS: the dynamic program -------------------------------------------------------------------------------------

def path_cost(cost, path, coeff):
    """The GITS objective of best_path's docstring, unrolled: cost[first jump] + coeff * (cost of the rest),
    recursively, i.e. sum_j coeff^j C[n_{j-1}, n_j, n_{j+1}] with n_{-1} = n_0 (the first jump has no previous)."""
    return sum(coeff ** j * float(cost[path[max(j - 1, 0)], path[j], path[j + 1]]) for j in range(len(path) - 1))


def brute_force(cost, steps, coeff):
    last = cost.shape[0] - 1
    paths = [(0,) + mid + (last,) for mid in itertools.combinations(range(1, last), steps - 1)]
    return min(paths, key=lambda path: path_cost(cost, path, coeff))


def random_cost(nodes, seed, pair):
    gen = torch.Generator().manual_seed(seed)
    shape = (nodes, nodes, nodes) if pair else (nodes, nodes)  # first order: independent of the previous node
    cost = torch.exp(2 * torch.randn(shape, generator=gen, dtype=torch.float64)).expand(nodes, nodes, nodes).clone()
    c, n = torch.meshgrid(torch.arange(nodes), torch.arange(nodes), indexing="ij")
    cost[:, n <= c] = float("inf")
    return cost


@pytest.mark.parametrize("pair", [False, True], ids=["first_order", "pair_indexed"])
@pytest.mark.parametrize("coeff", [1.0, 1.2])
def test_best_path_is_the_brute_force_optimum(m, pair, coeff):
    for nodes, seed in ((6, 0), (7, 1), (8, 2), (8, 3)):
        cost = random_cost(nodes, seed, pair)
        for steps in range(1, nodes):
            path = m.gits.best_path(cost, steps, coeff)
            want = brute_force(cost, steps, coeff)
            assert len(path) == steps + 1 and path[0] == 0 and path[-1] == nodes - 1
            assert all(a < b for a, b in zip(path, path[1:]))
            assert path_cost(cost, path, coeff) == pytest.approx(path_cost(cost, want, coeff), rel=1e-12)
            assert tuple(path) == want, (nodes, seed, steps)


def test_best_path_needs_enough_grid_points(m):
    cost = random_cost(6, 0, True)
    assert m.gits.best_path(cost, 5) == [0, 1, 2, 3, 4, 5]            # every node
    with pytest.raises(ValueError, match="raise the budget"):
        m.gits.best_path(cost, 6)


# --- GITS: the jump costs ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_teacher(m):
    """{flow: (grid, xs, ds, sigmas as the solvers see them)} for an 8-point grid and 3 guided samples."""
    out = {}
    for flow in (False, True):
        smin, smax = FLOW_RANGE if flow else EPS_RANGE
        grid = m.common.log_grid(smax, smin, 8, flow)
        xs, ds = m.common.teacher_trajectory(oracle(m, flow, 3.0, 3), start(3, 0, flow), grid, flow)
        out[flow] = grid, xs, ds, param(m, flow).capped(zero_end(grid))  # flow's sigma 1 -> the solvers' cap
    return out


def test_teacher_trajectory_records_the_states_and_denoiser_outputs(m, small_teacher):
    for flow in (False, True):
        grid, xs, ds, sig = small_teacher[flow]
        assert xs.shape == (9, 3, 4, 8, 8) and ds.shape == (8, 3, 4, 8, 8)
        d = oracle(m, flow, 3.0, 3)
        for c in range(8):
            torch.testing.assert_close(ds[c], d(xs[c], sig[c]), rtol=0, atol=1e-12)
        torch.testing.assert_close(xs[-1], ds[-1], rtol=0, atol=0)    # the output is the final denoise


def euler(x, d, s, t):
    return x + (t - s) * (x - d) / s


def dpmpp_2m(p, x, d, d_prev, s, t, s_prev=None):
    """DPM-Solver++(2M) by hand (Lu et al. 2022, Alg. 2) in lambda = log(alpha / sigma) of Param p; without a
    previous point, its first-order step (DDIM)."""
    lam = lambda v: p.lam(torch.tensor(v, dtype=torch.float64))
    h = lam(t) - lam(s)
    d_mix = d
    if s_prev is not None:
        r = (lam(s) - lam(s_prev)) / h
        d_mix = (1 + 1 / (2 * r)) * d - d_prev / (2 * r)
    alpha_t = p.alpha(torch.tensor(t, dtype=torch.float64))
    return (t / s) * x - alpha_t * torch.expm1(-h) * d_mix


def mean_sq(m, a, b):
    return m.common.mse(a, b).mean().item()


def mean_l2(m, a, b):
    """GITS's jump cost as its reference code measures it: the unsquared L2 norm per image, batch-averaged."""
    return (a - b).flatten(1).norm(dim=1).mean().item()


@pytest.mark.parametrize("flow", [False, True])
def test_euler_costs_are_hand_written_euler_steps(m, small_teacher, flow):
    grid, xs, ds, sig = small_teacher[flow]
    cost = m.gits.cost_tensor(xs, ds, grid, "euler", flow)
    last = len(grid)
    assert cost.shape == (last + 1,) * 3
    for c in range(last):
        for n in range(c + 1, last + 1):
            s, t = sig[c].item(), sig[n].item()
            want = mean_l2(m, ds[c] if n == last else euler(xs[c], ds[c], s, t), xs[n])
            for p in range(last + 1):  # first order: every previous node gives the same cost
                assert cost[p, c, n].item() == pytest.approx(want, rel=1e-9), (p, c, n)
        assert bool(torch.isinf(cost[:, c, :c + 1]).all())
    assert bool(torch.isinf(cost[:, last]).all())
    assert cost[0, 0, 1].item() == pytest.approx(mean_l2(m, euler(xs[0], ds[0], sig[0], sig[1]), xs[1]), rel=1e-9)


@pytest.mark.parametrize("flow,half_log_snr", [(False, True), (True, True), (True, False)])
def test_dpmpp_2m_costs_are_hand_written_multistep_steps(m, small_teacher, flow, half_log_snr):
    """C[p, c, n] (p < c) is one DPM-Solver++(2M) step from the teacher's x_c with D_p as its second point; the
    first jump (p = c = 0) is first order. half_log_snr=False steps flow models in -log sigma (ComfyUI's way)."""
    grid, xs, ds, sig = small_teacher[flow]
    p_lam = param(m, flow) if half_log_snr else m.core.VE
    if not half_log_snr:
        sig = zero_end(grid)
    cost = m.gits.cost_tensor(xs, ds, grid, "dpmpp_2m", flow, half_log_snr)
    last = len(grid)
    for n in range(1, last):
        ddim = dpmpp_2m(p_lam, xs[0], ds[0], None, sig[0].item(), sig[n].item())
        assert cost[0, 0, n].item() == pytest.approx(mean_l2(m, ddim, xs[n]), rel=1e-9)
    for c in range(1, last):
        for p in range(c):
            for n in range(c + 1, last + 1):
                s, t, s_prev = sig[c].item(), sig[n].item(), sig[p].item()
                jump = ds[c] if n == last else dpmpp_2m(p_lam, xs[c], ds[c], ds[p], s, t, s_prev)
                assert cost[p, c, n].item() == pytest.approx(mean_l2(m, jump, xs[n]), rel=1e-9), (p, c, n)


@pytest.mark.parametrize("kind", ["euler", "dpmpp_2m", "unipc"])
@pytest.mark.parametrize("flow", [False, True])
def test_costs_are_finite_exactly_where_a_path_can_use_them(m, small_teacher, kind, flow):
    grid, xs, ds, sig = small_teacher[flow]
    cost = m.gits.cost_tensor(xs, ds, grid, kind, flow)
    nodes = len(grid) + 1
    p, c, n = torch.meshgrid(*[torch.arange(nodes)] * 3, indexing="ij")
    usable = n > c
    if kind != "euler":  # multistep: a previous node before c, or the first jump from node 0
        usable &= (p < c) | ((p == 0) & (c == 0))
    assert bool(torch.isfinite(cost[usable]).all()) and bool(torch.isinf(cost[~usable]).all())
    assert bool((cost[usable] >= 0).all())
    # The final jump to sigma 0 is the denoise D_c, whatever the solver and history.
    for cc in range(nodes - 1):
        want = mean_l2(m, ds[cc], xs[-1])
        assert bool(torch.allclose(cost[:, cc, -1][usable[:, cc, -1]], torch.tensor(want, dtype=torch.float64),
                                   rtol=1e-12, atol=0))
    with pytest.raises(ValueError, match="unknown jump"):
        m.gits.cost_tensor(xs, ds, grid, "heun", flow)


def test_unipc_first_jump_is_the_trapezoidal_corrector(m, small_teacher):
    """UniC-1 (bh2) with the teacher's D at the target: x_t = (sigma_t/sigma_s) x + alpha_t (1 - e^-h) (D_s + D_t)/2."""
    for flow in (False, True):
        grid, xs, ds, sig = small_teacher[flow]
        p = param(m, flow)
        cost = m.gits.cost_tensor(xs, ds, grid, "unipc", flow)
        for n in range(1, len(grid)):
            trapezoid = (ds[0] + ds[n]) / 2
            step = dpmpp_2m(p, xs[0], trapezoid, None, sig[0].item(), sig[n].item())
            assert cost[0, 0, n].item() == pytest.approx(mean_l2(m, step, xs[n]), rel=1e-9), (flow, n)


# --- GITS: quality on the oracle -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def guided_flow(m):
    """The guided flow oracle (cfg 3) on a 24-point teacher grid to sigma_min = 0.01: the teacher of a calibration
    batch of 8, a held-out batch of 32 with its teacher output and the adaptive float64 reference."""
    d = oracle(m, True, 3.0, 8)
    grid = m.common.log_grid(1.0, FLOW_RANGE[0], 24, True)
    x, x_test = start(8, 0, True), start(32, 100, True)
    xs, ds = m.common.teacher_trajectory(d, x, grid, True)
    xs_test, _ = m.common.teacher_trajectory(d, x_test, grid, True)
    exact = m.reference.reference_sample(d, x_test, 1.0, FLOW_RANGE[0], 1e-8, 1e-8)
    return dict(d=d, grid=grid, x=x, xs=xs, ds=ds, x_test=x_test, teacher_test=xs_test[-1], exact=exact)


# Held-out bounds from measurement (ratios of GITS's error to each baseline's, mean / median per sample):
# l2 costs (the reference's), final error in L2: 5 steps 0.39 / 0.34 log_uniform, 0.51 / 0.45 grid_evenly,
# 0.75 / 0.70 sigma_uniform; 6 steps 0.76 / 0.73 log_uniform, but 1.13 / 1.10 grid_evenly and 1.30 / 1.70
# sigma_uniform (no gain there). mse costs (Stride's variant), final error in MSE: every ratio below 0.6 / 0.5
# (log_uniform) and 0.8 / 0.8 (the others) at 5 and 6 steps.
GITS_BOUNDS = {("l2", 5): {"log_uniform": 0.5, "grid_evenly": 0.6, "sigma_uniform": 0.85},
               ("l2", 6): {"log_uniform": 0.85},
               ("mse", 5): {"log_uniform": 0.6, "grid_evenly": 0.8, "sigma_uniform": 0.8},
               ("mse", 6): {"log_uniform": 0.6, "grid_evenly": 0.8, "sigma_uniform": 0.8}}


@pytest.mark.parametrize("metric,steps", list(GITS_BOUNDS))
def test_gits_beats_simple_schedules_on_the_guided_flow_oracle(m, guided_flow, metric, steps):
    """GITS (cost_tensor with dpmpp_2m jumps + best_path) calibrated on 8 samples, measured on 32 others with
    DPM-Solver++(2M) against the held-out teacher and against the adaptive reference, in the metric its costs
    use. Baselines: uniform in lambda (log_grid), evenly spaced nodes of the same teacher grid, and uniform in
    sigma (as ComfyUI's simple). (Without guidance, cfg 1, the gain is not reliable.)"""
    g = guided_flow
    cost = m.gits.cost_tensor(g["xs"], g["ds"], g["grid"], "dpmpp_2m", flow=True, metric=metric)
    path = m.gits.best_path(cost, steps, 1.0)
    ours = m.gits.path_sigmas(g["grid"], path)
    assert len(ours) == steps + 1 and ours[0] == 1.0 and ours[-1] == 0
    last = len(g["grid"]) - 1
    baselines = {
        "log_uniform": log_uniform(m, steps, True),
        "grid_evenly": m.gits.path_sigmas(g["grid"], [round(i * last / (steps - 1)) for i in range(steps)]
                                          + [last + 1]),
        "sigma_uniform": zero_end(torch.linspace(1.0, FLOW_RANGE[0], steps, dtype=torch.float64)),
    }
    # GITS's jumps model plain 2M steps (ComfyUI's dpmpp_2m): measured without Stride's divergence guard
    run = lambda s: m.multistep.sample_dpmpp(g["d"], g["x_test"], s.double(), param=m.core.FLOW, order=2, guard=False)
    out = run(ours)
    sq = lambda a, b: m.common.mse(a, b).mean().item()
    assert sq(g["teacher_test"], g["exact"]) < 0.01 * sq(run(baselines["log_uniform"]), g["exact"])
    measure = m.gits.l2 if metric == "l2" else m.common.mse
    for name, bound in GITS_BOUNDS[(metric, steps)].items():
        base = run(baselines[name])
        for target in (g["teacher_test"], g["exact"]):
            err, err_base = measure(out, target), measure(base, target)
            assert err.mean() < bound * err_base.mean(), (name, err.mean(), err_base.mean())
            assert err.median() < bound * err_base.median(), (name, err.median(), err_base.median())


# --- Align Your Steps ----------------------------------------------------------------------------------------------

def klub_total(m, klub, sched, sigma_min, flow):
    """Sum of KLUB over the intervals of a schedule's nodes (down to sigma_min), in VE sigmas, as optimize sees it."""
    nodes = m.common.nodes_to_floor(sched, sigma_min)
    if flow:
        nodes[0] = min(float(nodes[0]), 1 - 1e-4)
    nodes = [m.ays.to_ve(float(s), flow) for s in nodes]
    return sum(klub(nodes[i + 1], nodes[i]) for i in range(len(nodes) - 1))


@pytest.mark.parametrize("flow", [False, True])
def test_ays_lowers_the_klub(m, flow):
    """Coordinate descent lowers the KLUB estimate it minimises (same draws), and a finer held-out estimate
    (other data, other noises, 8 points per interval) agrees."""
    batch, smin = 4, (FLOW_RANGE if flow else EPS_RANGE)[0]
    d = oracle(m, flow, 1.0, batch)
    x0 = m.mixture.sample(batch, LABELS[:batch], torch.Generator().manual_seed(0)).view(batch, 4, 8, 8)
    init = floor_schedule(m, 5, flow)
    counted = m.common.Counted(d, batch)
    out, sweeps = m.ays.optimize(counted, x0, init, smin, flow=flow, sweeps=2)
    assert 1 <= sweeps <= 2 and len(out) == len(init) and out[0] == init[0] and out[-1] == 0
    assert bool((torch.diff(out) < 0).all()) and float(out[-2]) > smin
    same = m.ays.KLUB(m.ays.ve_denoiser(d, flow), x0, 2, 0)
    assert klub_total(m, same, out, smin, flow) < 0.8 * klub_total(m, same, init, smin, flow)
    x0_test = m.mixture.sample(batch, LABELS[:batch], torch.Generator().manual_seed(7)).view(batch, 4, 8, 8)
    fine = m.ays.KLUB(m.ays.ve_denoiser(d, flow), x0_test, 8, 5)
    assert klub_total(m, fine, out, smin, flow) < 0.8 * klub_total(m, fine, init, smin, flow)


def test_ays_budget(m):
    batch, smin = 2, EPS_RANGE[0]
    d = oracle(m, False, 1.0, batch)
    x0 = m.mixture.sample(batch, LABELS[:batch], torch.Generator().manual_seed(0)).view(batch, 4, 8, 8)
    init = floor_schedule(m, 4, False)
    # One sweep: 3 interior sigmas x (5 candidates + the current one) x 2 KLUBs x 2 x points(2) rows per sample.
    with pytest.raises(m.common.BudgetExceeded):
        m.ays.optimize(m.common.Counted(d, batch, budget=100), x0, init, smin)
    counted = m.common.Counted(d, batch, budget=200)
    out, sweeps = m.ays.optimize(counted, x0, init, smin, sweeps=3)
    assert sweeps == 1 and 144 < counted.calls <= 200 and bool((torch.diff(out) < 0).all())  # stopped in sweep 2


def test_ve_denoiser_turns_the_flow_oracle_into_the_eps_oracle(m):
    """Same data distribution: D_flow((1 - s) x~, s) = D_eps(x~, s~) with s~ = s / (1 - s)."""
    s_ve = torch.tensor([0.05, 0.7, 3.0, 40.0], dtype=torch.float64)
    x = noise(4, 2) * s_ve.view(-1, 1, 1, 1) + m.mixture.sample(4, LABELS[:4], torch.Generator().manual_seed(1)) \
        .view(4, 4, 8, 8)
    for cfg in (1.0, 3.0):
        ve = m.ays.ve_denoiser(oracle(m, True, cfg), True)(x, s_ve)
        assert (ve - oracle(m, False, cfg)(x, s_ve)).abs().max().item() < 1e-10
    d = oracle(m, False, 1.0)
    assert m.ays.ve_denoiser(d, False) is d
    s = torch.tensor([0.001, 0.3, 0.9999], dtype=torch.float64)
    torch.testing.assert_close(m.ays.from_ve(m.ays.to_ve(s, True), True), s, rtol=1e-12, atol=0)
    assert torch.equal(m.ays.to_ve(s, False), s)


# --- LD3 -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flow", [False, True])
def test_ld3_logits_round_trip_the_initial_schedule(m, flow):
    """Align Your Steps convention (the final denoise above sigma_min): the logits reproduce the schedule."""
    smin = (FLOW_RANGE if flow else EPS_RANGE)[0]
    for steps in (3, 5, 8):
        init = floor_schedule(m, steps, flow)
        theta = m.ld3.logits_from(init, smin, param(m, flow))
        assert theta.shape == (steps + 1,)
        back = m.ld3.sigmas_from(theta, init, smin, param(m, flow))
        assert back[0] == init[0] and back[-1] == 0
        torch.testing.assert_close(back.float(), init, rtol=1e-5, atol=0)


def test_ld3_starts_a_schedule_ending_at_sigma_min_in_the_tables_convention(m):
    """ComfyUI's schedules end at sigma_min, then 0: LD3 learns N + 1 nodes down to sigma_min, the last becoming
    the final 0, so it starts from the schedule resampled to N + 1 nodes (no model call spent at sigma_min)."""
    init = K.get_sigmas_karras(5, EPS_RANGE[0], EPS_RANGE[1])
    back = m.ld3.sigmas_from(m.ld3.logits_from(init, EPS_RANGE[0], m.core.VE), init, EPS_RANGE[0], m.core.VE)
    want = m.common.resample(init, 6)[:-1]
    torch.testing.assert_close(back[:-1].float(), want[:-1], rtol=1e-5, atol=0)
    assert back[-1] == 0 and len(back) == 6


@pytest.fixture(scope="module")
def ld3_setup(m):
    """LD3 on the guided flow oracle, 5 steps: 4 calibration samples, 4 held-out ones."""
    d = oracle(m, True, 3.0, 4)
    grid = m.common.log_grid(1.0, FLOW_RANGE[0], 24, True)
    x, x_test = start(4, 0, True), start(4, 1, True)
    target = m.common.teacher_trajectory(d, x, grid, True)[0][-1]
    target_test = m.common.teacher_trajectory(d, x_test, grid, True)[0][-1]
    # plain 2M (no divergence guard), as LD3 learns for ComfyUI's dpmpp_2m
    solve = lambda model, x_, sigmas: m.multistep.sample_dpmpp(model, x_, sigmas, param=m.core.FLOW, order=2,
                                                               guard=False)
    return dict(d=d, x=x, x_test=x_test, target=target, target_test=target_test, solve=solve,
                init=floor_schedule(m, 5, True))


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")
def test_ld3_lowers_the_loss_and_the_held_out_error(m, ld3_setup):
    s = ld3_setup
    counted = m.common.Counted(s["d"], 4)
    best, loss, first, iters = m.ld3.optimize(counted, s["solve"], s["x"], s["target"], s["init"], FLOW_RANGE[0],
                                              m.core.FLOW, max_iters=15)
    assert iters == 15 and best[0] == s["init"][0] and best[-1] == 0 and bool((torch.diff(best) < 0).all())
    assert first == pytest.approx(mean_sq(m, s["solve"](s["d"], s["x"], s["init"].double()), s["target"]), rel=1e-6)
    assert loss <= first and loss < 0.7 * first
    held = lambda sigmas: mean_sq(m, s["solve"](s["d"], s["x_test"], sigmas.double()), s["target_test"])
    assert held(best) < 0.9 * held(s["init"])


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")
def test_ld3_needs_a_budget_of_two_iterations(m, ld3_setup):
    s = ld3_setup
    for budget in (4, 10, 25, 49):  # 5 steps: two iterations of 4 per model call, and 2 for the check
        with pytest.raises(m.common.BudgetExceeded):
            m.ld3.optimize(m.common.Counted(s["d"], 4, budget=budget), s["solve"], s["x"], s["target"], s["init"],
                           FLOW_RANGE[0], m.core.FLOW)


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")
def test_ld3_stops_cleanly_when_the_budget_runs_out_after_two_iterations(m, ld3_setup):
    s = ld3_setup
    counted = m.common.Counted(s["d"], 4, budget=55)
    best, loss, first, iters = m.ld3.optimize(counted, s["solve"], s["x"], s["target"], s["init"], FLOW_RANGE[0],
                                              m.core.FLOW)
    assert iters >= 2 and counted.calls <= 55  # (its gain is tested on held-out noises above, with a full budget)


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")
def test_ld3_charges_the_documented_evaluations_per_iteration(m, ld3_setup):
    s = ld3_setup
    counted = m.common.Counted(s["d"], 4)
    m.ld3.optimize(counted, s["solve"], s["x"], s["target"], s["init"], FLOW_RANGE[0], m.core.FLOW, max_iters=2)
    assert counted.calls == 2 * 4 * 5 + 2 * 5  # forward, recomputation, 2 for the backward; the check


def test_checkpointed_calls_differentiate_networks_that_edit_saved_tensors_in_place(m):
    """ComfyUI's Flux blocks add into their residual stream in place after autograd saved it. Differentiated plainly
    such a network fails; each checkpointed call (LD3, Bespoke) gets the gradient of the same network written
    out of place."""
    w = torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def network(in_place):
        def denoiser(x, sigma):
            h = x @ w
            a = h * h  # saves h
            h = h.add_(a) if in_place else h + a
            return h * sigma[:, None]
        return denoiser

    def grad(denoiser):
        x = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        denoiser(x * 1.0, torch.full((3,), 0.5, dtype=torch.float64)).pow(2).sum().backward()
        return x.grad

    with pytest.raises(RuntimeError, match="inplace"):
        grad(network(True))
    torch.testing.assert_close(grad(m.common.checkpoint_calls(network(True))), grad(network(False)))


# --- evolutionary search -------------------------------------------------------------------------------------------

def evolution_run(m, s, steps, budget, seed, **options):
    counted = m.common.Counted(s["d"], 4, budget=budget)
    fitness = lambda sigmas: m.common.mse(s["solve"](counted, s["x"], sigmas.double()), s["target"]).mean()
    init = zero_end(m.common.log_grid(1.0, FLOW_RANGE[0], steps, True)).float()
    return m.evolution.search(fitness, init, FLOW_RANGE[0], flow=True, seed=seed, **options), counted


def test_evolution_improves_respects_the_budget_and_is_deterministic(m, ld3_setup):
    steps = 4
    (best, err, initial, evaluated), counted = evolution_run(m, ld3_setup, steps, 30 * steps, seed=0)
    assert counted.calls <= 30 * steps and evaluated == 30 and counted.calls == 30 * steps
    assert err <= initial and err < 0.7 * initial
    held = lambda sigmas: mean_sq(m, ld3_setup["solve"](ld3_setup["d"], ld3_setup["x_test"], sigmas.double()),
                                  ld3_setup["target_test"])
    init = zero_end(m.common.log_grid(1.0, FLOW_RANGE[0], steps, True)).float()
    assert held(best) < 0.4 * held(init)  # on 4 held-out noises; measured 0.30
    assert len(best) == steps + 1 and best[0] == 1.0 and best[-1] == 0 and bool((torch.diff(best) < 0).all())
    assert err == pytest.approx(mean_sq(m, ld3_setup["solve"](ld3_setup["d"], ld3_setup["x"], best.double()),
                                         ld3_setup["target"]), rel=1e-9)
    (again, err2, initial2, evaluated2), _ = evolution_run(m, ld3_setup, steps, 30 * steps, seed=0)
    assert torch.equal(best, again) and (err2, initial2, evaluated2) == (err, initial, evaluated)
    with pytest.raises(m.common.BudgetExceeded):  # not even the first generation
        evolution_run(m, ld3_setup, steps, 10 * steps, seed=0)


class Timeout(Exception):
    pass


@pytest.mark.parametrize("steps,grid_size", [(1, 200), (2, 10)])
def test_evolution_stops_when_the_search_space_is_exhausted(m, ld3_setup, steps, grid_size):
    def alarm(*_):
        raise Timeout()
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(3)
    try:
        (best, err, initial, evaluated), counted = evolution_run(m, ld3_setup, steps, 100 * steps, seed=0,
                                                                 grid_size=grid_size)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert evaluated <= math.comb(grid_size, steps - 1)  # it stops (its gain: the test above, held out)


# --- differentiability of the multistep samplers in their sigmas -----------------------------------------------------

DIFF_SAMPLERS = {
    "dpmpp_2m": lambda m, d, x, s, p: m.multistep.sample_dpmpp(d, x, s, param=p, order=2),
    "dpmpp_3m": lambda m, d, x, s, p: m.multistep.sample_dpmpp(d, x, s, param=p, order=3),
    "unipc_bh1": lambda m, d, x, s, p: m.multistep.sample_unipc(d, x, s, param=p, order=3),
    "unipc_bh2": lambda m, d, x, s, p: m.multistep.sample_unipc(d, x, s, param=p, order=2, variant="bh2"),
}


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")
@pytest.mark.parametrize("flow", [False, True])
@pytest.mark.parametrize("name", list(DIFF_SAMPLERS))
def test_samplers_are_differentiable_in_the_sigmas(m, flow, name):
    """d(w . output)/d sigmas by autograd: finite, nonzero at every nonzero sigma, and equal to a central finite
    difference (float64, exact oracle) within 1e-4 relative."""
    run, p, d = DIFF_SAMPLERS[name], param(m, flow), oracle(m, flow, 3.0, 2)
    if flow:
        sigmas = zero_end(torch.tensor([0.95, 0.8, 0.55, 0.3, 0.12, 0.04], dtype=torch.float64))
    else:
        sigmas = zero_end(torch.exp(torch.linspace(math.log(10.0), math.log(0.1), 6, dtype=torch.float64)))
    x = noise(2, 4) * sigmas[0] if not flow else noise(2, 4)
    w = noise(2, 5)
    f = lambda s: (run(m, d, x, s, p) * w).sum()
    sig = sigmas.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(f(sig), sig)
    assert bool(torch.isfinite(grad).all()) and bool((grad[:-1] != 0).all())
    for j in (1, 3):
        eps = 1e-6 * sigmas[j].item()
        bump = torch.zeros_like(sigmas)
        bump[j] = eps
        with torch.no_grad():
            fd = (f(sigmas + bump) - f(sigmas - bump)).item() / (2 * eps)
        assert grad[j].item() == pytest.approx(fd, rel=1e-4), (j, grad[j].item(), fd)
