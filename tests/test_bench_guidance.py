"""bench.guidance's measuring function on a tiny grid: every method runs through its node on the flow oracle,
its quality is measured, and the evaluations counted inside the model are the ones each method should spend.

The full measurement is `.venv/bin/python -m bench.guidance`.
"""
import math

from bench import guidance


def test_measure_counts_and_scores_every_method(stride):
    results = guidance.measure(["oracle_flow"], seeds=1, steps=(4,), scales=(5.0,))
    rows = results["oracle_flow"]
    assert rows[0]["method"] == "reference" and rows[0]["accuracy"] >= 0.9
    by = {(r["method"], r["steps"]): r for r in rows[1:]}
    assert {m for m, _ in by} == set(guidance.METHODS)
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and math.isfinite(r["fd"]) and math.isfinite(r["loglik"]) and r["finite"]
    # The simple flow schedule at 4 steps evaluates at progress 0, 0.25, 0.5, 0.75: the ramps have scale 1 (no
    # unconditional pass) at the first step only, the 0.2-0.8 interval guides the last three, clamp_linear
    # (floor 2) and RAAG (which needs the unconditional pass) never skip it; no guidance (cfg 1) always does.
    expected = {"cfg": 8, "raag w=cfg": 8, "raag 18/144": 8, "linear": 7, "cosine": 7, "interval": 7,
                "clamp_linear": 8, "no guidance": 4}
    assert {m: by[(m, 4)]["evals_per_image"] for m in expected} == expected
    assert by[("cfg", 4)]["cond_passes"] == 4 and by[("cfg", guidance.REFERENCE_STEPS)]["evals_per_image"] == 60
    # The patches are really applied: RAAG at max_guidance = cfg does not reproduce constant CFG.
    assert by[("raag w=cfg", 4)]["fd"] != by[("cfg", 4)]["fd"]
    summary = guidance.anchor(results, (4,), (5.0,), "fd")
    assert set(summary["oracle_flow"][5.0]) == set(guidance.METHODS)
    assert all(v in (4, None) for v in summary["oracle_flow"][5.0].values())
