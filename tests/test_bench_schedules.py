"""bench.schedules in its quick mode: every schedule row (the four schedulers, the AYS/GITS tables and the four
Stride optimizers run through their nodes) measured for every solver x NFE column, with finite errors, and
each calibration's cost within the one budget all optimizers share.

The full measurement is `.venv/bin/python -m bench.schedules`.
"""
import math

import folder_paths

from bench import schedules


def test_quick_run_fills_every_row_and_column(stride):
    plan = {name: {**schedules.MODELS[name], **schedules.QUICK_GRID} for name in schedules.QUICK_MODELS}
    store = stride("nodes.calibration_store")
    store.register()
    paths_before = folder_paths.folder_names_and_paths[store.FOLDER]
    rows, calibrations = schedules.measure(plan, schedules.QUICK_BUDGET, schedules.QUICK_SAMPLES, log=lambda _: None)
    assert folder_paths.folder_names_and_paths[store.FOLDER] == paths_before  # the store is put back

    (model, cfg), = schedules.settings(rows)
    grid = plan[model]
    table = schedules.error_table(rows, model, cfg).splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header == ["schedule"] + [f"{s} {n}" for s in grid["solvers"] for n in grid["nfes"]]
    body = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    assert [r[0] for r in body] == schedules.SCHEDULES
    for line in body:  # oracle_eps has SD1.5's sigma range: the tables apply, and every cell is measured
        for cell in line[1:]:
            mean, median = (float(v.strip("*")) for v in cell.split(" / "))
            assert math.isfinite(mean) and math.isfinite(median) and mean >= 0
    assert all(r["nfe"] == r["target_nfe"] for r in rows)
    assert sum("**" in cell for line in body for cell in line[1:]) == len(header) - 1  # one best per column

    # Each optimizer calibrated (GITS and AYS fewer times: a stored cost matrix, a solver-free objective) within
    # the shared budget, and its cost is what the cost table shows.
    runs = {o: [c for c in calibrations if c["optimizer"] == o] for o in schedules.OPTIMIZERS}
    assert len(runs["Stride GITS"]) == len(grid["solvers"]) and len(runs["Stride AYS"]) == len(grid["nfes"])
    assert len(runs["Stride LD3"]) == len(runs["Stride evolution"]) == len(grid["solvers"]) * len(grid["nfes"])
    for c in calibrations:
        assert 0 < c["evaluations"] <= schedules.QUICK_BUDGET and c["seconds"] > 0
    costs = schedules.cost_table(calibrations, model, cfg).splitlines()
    assert [line.split("|")[1].strip() for line in costs[2:]] == list(schedules.OPTIMIZERS)
    summary = schedules.summary_table(rows).splitlines()
    assert len(summary) == 2 + 2 * len(schedules.OPTIMIZERS)  # the setting, then all settings


def test_a_failed_run_of_either_side_counts_as_a_loss():
    """Win/loss tables: a baseline whose run failed (None or inf) is a loss of the optimizer, never a win (the old
    ratio was 0 there); a cell the optimizer was never measured in counts neither way."""
    from bench.common import error_ratio
    assert error_ratio(0.1, 0.2) == 0.5 and error_ratio(0.0, 0.0) == 1.0
    assert all(error_ratio(a, b) > 1 for a, b in ((0.1, math.inf), (0.1, None), (math.inf, 0.1), (None, 0.1),
                                                  (0.1, 0.0)))
    row = lambda schedule, nfe, error: {"model": "m", "cfg": 1.0, "schedule": schedule, "solver": "euler",
                                        "target_nfe": nfe, "error": error}
    # no AYS table: a flow model, whose default schedule is simple
    rows = [row("simple", n, 0.2) for n in (4, 6)] + [row("Stride LD3", n, 0.1) for n in (4, 6)]
    rows += [row("Stride evolution", 4, None), row("Stride evolution", 6, 0.05)]
    ratios = schedules.comparisons(rows, "m", 1.0)["Stride LD3"]
    assert sorted(ratios["evolution"]) == [2.0, math.inf] and ratios["default"] == [0.5, 0.5]
    assert schedules.comparisons(rows, "m", 1.0)["Stride GITS"] == {"builtin": [], "default": [], "evolution": []}
