"""bench.structural in its quick mode: ParaDiGMS, Bottleneck, teleportation and ReDi through their nodes (the two
calibrated ones in a fresh calibration store), each beside the same sampling without the method, with the
expected rows and columns, finite errors, the nodes' logged rounds / compute fraction, an honest 'n/a' where a
model cannot run a method, and anchor lines quoting the papers beside measured numbers.

The full measurement is `.venv/bin/python -m bench.structural` (docs/bench_structural.md).
"""
import math

import folder_paths

from bench import structural


def _body(table):
    lines = table.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return header, [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def _errors(cell):
    mean, median = (float(v) for v in cell.split(" (")[0].split(" / "))
    assert math.isfinite(mean) and math.isfinite(median) and mean >= 0 and median >= 0
    return mean


def test_quick_run_fills_every_table(stride):
    store = stride("nodes.calibration_store")
    store.register()
    paths_before = folder_paths.folder_names_and_paths[store.FOLDER]
    rows, records = structural.measure(structural.QUICK, log=lambda _: None)
    assert folder_paths.folder_names_and_paths[store.FOLDER] == paths_before  # the store is put back

    # ParaDiGMS: rounds <= steps <= evaluations per image, one counted model call per round, same error scale.
    header, body = _body(structural.paradigms_table(rows))
    assert len(header) == 10 and len(body) == 1
    model, steps, window, rounds, evaluations, calls, wall, ratio, err, base = body[0]
    assert (model, steps, window) == ("oracle_eps", "10", "4")
    par_rounds, seq_rounds = map(int, rounds.split(" / "))
    assert seq_rounds == 10 and 1 <= par_rounds <= 10 and int(calls) == par_rounds
    assert int(evaluations.split(" / ")[0]) >= 10
    assert all(float(w) > 0 for w in wall.split(" / ")) and float(ratio) > 0
    _errors(err), _errors(base)

    # Bottleneck: n/a (with the reason) on the oracle, measured on the DiT at the same NFE as euler.
    header, body = _body(structural.bottleneck_table(rows))
    assert len(header) == 10 and [r[0] for r in body] == ["oracle_eps", "dit_small"]
    assert body[0][3].startswith("n/a: ") and len(body[0][3]) > 10
    nfe, compute = body[1][4], body[1][5]
    assert nfe == "10 / 10" and 0 < float(compute.rstrip("%")) < 100
    assert "(4x4)" in body[1][3]
    _errors(body[1][8]), _errors(body[1][9])

    # Teleportation: NFE = steps - round(skip * steps), beside dpmpp_2m at that NFE and at all steps.
    header, body = _body(structural.teleport_table(rows))
    assert len(header) == 9 and len(body) == 1
    assert body[0][:6] == ["oracle_eps", "3", "10", "0.2", "8", "20%"]
    _errors(body[0][6])
    assert body[0][7].endswith("(8)") and body[0][8].endswith("(10)")
    _errors(body[0][7]), _errors(body[0][8])

    # ReDi: value_step - key_step steps retrieved, beside DDIM at that NFE and at all steps.
    header, body = _body(structural.redi_table(rows))
    assert len(header) == 9 and len(body) == 1
    assert body[0][:5] == ["oracle_eps", "3", "10", "2, 4", "8"]
    _errors(body[0][6]), _errors(body[0][7]), _errors(body[0][8])

    # One calibration per method and class, its cost counted inside the model and agreeing with the node's count.
    assert [c["node"] for c in records] == ["StrideCalibrateTeleport", "StrideBuildReDi"]
    for c in records:
        assert c["evaluations"] > 0 and c["wall_seconds"] > 0
        assert math.isclose(c["evaluations"], c["node_evaluations"], rel_tol=0.01)
    assert len(structural.cost_table(records).splitlines()) == 2 + len(records)

    # Anchors: the quoted papers' numbers beside measured ones (no typed numbers).
    lines = structural.anchors(rows)
    assert len(lines) == 3
    assert "2-4x" in lines[0] and "3x" in lines[1] and "15-30%" in lines[2]
    assert "none measured" not in "".join(lines) and "20%" in lines[2]
