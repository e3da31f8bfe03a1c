"""bench.accel in its quick mode: every cache (Stride's plan, step cache by input change and by first-block
residual, ComfyUI's EasyCache and LazyCache) and the T-Stitch curve measured beside the uncached run on the
trained DiT, with the counts read from the nodes' own log lines, finite speed ratios and errors, the equal-error
comparison, and the store put back.

The full measurement is `.venv/bin/python -m bench.accel` (docs/bench_accel.md).
"""
import math
import re

import folder_paths

from bench import accel


def _body(table):
    return [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]


def test_quick_run_fills_every_table(stride):
    store = stride("nodes.calibration_store")
    store.register()
    before = folder_paths.folder_names_and_paths[store.FOLDER]
    caches, stitches = accel.measure(accel.QUICK, log=lambda _: None)
    assert folder_paths.folder_names_and_paths[store.FOLDER] == before

    body = _body(accel.cache_table(caches))
    methods = [row[2] for row in body]
    assert methods == ["Stride step cache (input change)", "Stride step cache (first block)",
                       "Stride cache plan (InvarDiff)", "ComfyUI EasyCache", "ComfyUI LazyCache"]
    for model, steps, method, setting, skipped, speed, mean, worst in body:
        assert model == "dit_large 8x8" and steps == "10"
        hits, total = map(int, re.match(r"(\d+)/(\d+)", skipped).groups())
        assert total == 10 and 0 <= hits < total
        assert float(speed.lstrip("x")) > 0 and 0 <= float(mean) <= float(worst) and math.isfinite(float(worst))
    first_block = body[1][4]
    assert re.search(r", \d+/60 blocks", first_block)  # dit_large: 6 blocks a call
    assert "calibrated in" in body[2][3]

    comparison = _body(accel.best_at_equal_error(caches))
    assert len(comparison) == 1 and comparison[0][1] == "threshold 0.2"

    stitch = _body(accel.stitch_table(stitches))
    assert [row[2] for row in stitch] == ["0.0", "0.4"]
    assert stitch[0][3] == "0/10" and float(stitch[0][5]) == 0.0  # fraction 0 is the large model exactly
    small, total = map(int, stitch[1][3].split("/"))
    assert total == 10 and 0 < small < 10
    assert all(0 <= float(row[6]) <= 1 and row[7] == stitch[0][7] for row in stitch)
