"""bench.autotune: a small run fills every column from measurements, its summary is recomputed from the rows (a
baseline that failed counts as a loss), and the README's Autotune sentence is the summary of the run in docs/."""
import json
import math
import os

from bench import autotune, host


def test_a_small_run_measures_every_column(stride):
    mode = {**autotune.QUICK, "nfes": [4], "samples": 8, "budget": 1500, "methods": "", "seeds": [0]}
    rows = autotune.measure({"oracle_flow": [3.0]}, mode)
    (row,) = rows
    assert row["counted_nfe"] <= 4 and math.isfinite(row["error"]) and row["kind"] == "built-in"
    assert row["best_builtin"] != "none ran" and row["error_at_10"] < row["builtin_error"]
    assert row["tune_evaluations"] > 0 and row["tune_seconds"] > 0
    table = autotune.table(rows)
    assert table.count("\n| oracle_flow |") == 1 and row["winner"] in table


def test_summary_counts_a_failed_baseline_as_a_loss():
    row = {"nfe": 5, "error": 0.1, "builtin_error": 0.3, "error_at_10": 0.05}
    assert autotune.summary([row]) == {"nfe5_half": 1, "nfe5_matches_10": 0, "nfe5_settings": 1, "not_worse": 1,
                                       "rows": 1}
    failed = {**row, "builtin_error": math.inf, "error_at_10": math.nan}
    assert autotune.summary([failed]) == {"nfe5_half": 0, "nfe5_matches_10": 0, "nfe5_settings": 1, "not_worse": 0,
                                          "rows": 1}
    assert autotune.summary([{**row, "error": math.inf}])["not_worse"] == 0


def test_the_readme_quotes_the_run_in_docs():
    with open(os.path.join(host.REPO, "docs", "bench_autotune.json")) as f:
        s = autotune.summary(json.load(f)["rows"])
    readme = open(os.path.join(host.REPO, "README.md"), encoding="utf-8").read()
    docs = open(os.path.join(host.REPO, "docs", "bench_autotune.md"), encoding="utf-8").read()
    claim = (f"at most half the best built-in's error in {s['nfe5_half']} of {s['nfe5_settings']} settings")
    assert claim in readme and claim in docs
    assert f"in {s['not_worse']} of {s['rows']} rows" in readme
