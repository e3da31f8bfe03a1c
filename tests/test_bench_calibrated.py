"""bench.solvers --calibrated in its quick mode: every calibrated solver calibrated through its node in a fresh
calibration store, measured beside UniPC, DPM-Solver++ 2M and the best built-in, with finite errors, the expected
rows and NFE columns, the MSE-ratio rows with the papers' anchors computed from their quoted numbers, and one
cost record per calibration.

The full measurement is `.venv/bin/python -m bench.solvers --calibrated` (docs/bench_calibrated.md).
"""
import math

import folder_paths

from bench import calibrated


REFUSED_NOTE = calibrated.REFUSED


def _body(table):
    lines = table.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return header, [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def test_quick_run_fills_every_row_and_column(stride):
    plan = calibrated.CAL_QUICK
    store = stride("nodes.calibration_store")
    store.register()
    paths_before = folder_paths.folder_names_and_paths[store.FOLDER]
    rows, calibrations = calibrated.measure_calibrated(plan, calibrated.CAL_QUICK_SAMPLES, log=lambda _: None)
    assert folder_paths.folder_names_and_paths[store.FOLDER] == paths_before  # the store is put back

    (model, cfg), = calibrated.settings(rows)
    nfes = plan[model]["nfes"]
    header, body = _body(calibrated.calibrated_error_table(rows, model, cfg, nfes))
    assert header == ["solver"] + [f"NFE {n}" for n in nfes]
    assert [r[0] for r in body] == [label for label, _, _ in calibrated.CAL_TABLE]
    refused = set()
    for line in body:
        for n, cell in zip(nfes, line[1:]):
            if line[0] == "IIA (Heun)" and n < 5:  # (NFE + 1) // 2 = 2 steps: too few to calibrate
                assert cell == "n/a"
                continue
            if cell == "refused":  # lost to its base on its held-out calibration noise: reported, with its cost
                method = line[0]
                assert any(c["method"] == method and c["refused"] and c["evaluations"] > 0 and c["held_error"] is None
                           for c in calibrations), (method, n)
                refused.add(method)
                continue
            mean, median = (float(v.strip("*")) for v in cell.split(" (")[0].split(" ")[0:3:2])
            assert math.isfinite(mean) and math.isfinite(median) and mean >= 0
    assert all(sum("**" in line[i] for line in body) >= 1 for i in range(1, len(header)))  # a best per column
    measured = [r for r in rows if r.get("error") is not None]
    assert all(r["nfe"] <= r["target_nfe"] for r in measured)
    assert all(r["nfe"] == r["target_nfe"] for r in measured if r["sampler"] not in ("heun", "IIA (Heun)"))

    header, body = _body(calibrated.calibrated_ratio_table(rows, model, cfg, nfes))
    assert header[-1] == f"paper, NFE {calibrated.ANCHOR_NFE}"
    assert [r[0] for r in body] == [label for label, *_ in calibrated.CAL_RATIOS]
    anchors = {r[0]: r[-1] for r in body}
    assert anchors["DC-Solver / UniPC-2 bh2 (its base)"].endswith(f"= {0.394 / 0.434:.3f}")
    assert anchors["v3 per-channel / dpmpp_2m (ComfyUI)"].endswith(f"= {0.55 / 0.60:.3f}")
    for line in body:
        for n, cell in zip(nfes, line[1:-1]):
            if line[0].startswith("IIA Heun") and n < 5:
                assert cell == ""
                continue
            numerator, denominator = next(r[1:3] for r in calibrated.CAL_RATIOS if r[0] == line[0])
            values = [calibrated.cal_value(rows, model, cfg, name, n) for name in (numerator, denominator)]
            if any(v.get("error") is None for v in values):  # a refused calibration: no ratio
                assert cell == "" and any(REFUSED_NOTE in v.get("note", "") for v in values), (line[0], n)
                continue
            assert math.isfinite(float(cell.strip("*"))) and float(cell.strip("*")) > 0

    # One calibration per NFE for DC-Solver and IIA (Heun: the NFEs with 3 steps or more), one per statistics
    # kind for DPM-Solver-v3; each cost counted inside the model, and the node's own count agrees.
    per = {m: [c for c in calibrations if c["method"] == m] for m in calibrated.CAL_METHODS}
    assert len(per["DC-Solver (UniPC-2 bh2)"]) == len(per["IIA (DDIM)"]) == len(nfes)
    assert len(per["IIA (Heun)"]) == sum((n + 1) // 2 >= 3 for n in nfes)
    assert len(per["DPM-Solver-v3 per-channel"]) == len(per["DPM-Solver-v3 per-element"]) == 1
    for c in calibrations:
        assert c["evaluations"] > 0 and c["wall_seconds"] > 0
        if not c["refused"]:
            assert math.isclose(c["evaluations"], c["node_evaluations"], rel_tol=0.01)
    assert len(refused) < len(calibrated.CAL_METHODS)  # some calibration passes its held-out check
    listed = calibrated.calibrated_failures(rows, refused=True)
    assert {m for m in calibrated.CAL_METHODS if any(line.startswith(f"{m} ({model}") for line in listed)} == refused
    assert not calibrated.calibrated_failures(rows)
    costs = calibrated.calibration_cost_table(calibrations).splitlines()
    assert [line.split("|")[1].strip() for line in costs[2:]] == list(calibrated.CAL_METHODS)
    summary = calibrated.calibrated_summary_table(rows).splitlines()
    assert len(summary) == 2 + len(calibrated.CAL_RATIOS)
