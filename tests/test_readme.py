"""The README is a user's guide: short, every link leads somewhere, and each number it quotes is in the table of
the benchmark run it cites (docs/, printed by the bench programs)."""
import os
import re

from bench import host

README = open(os.path.join(host.REPO, "README.md"), encoding="utf-8").read()


def docs(name):
    with open(os.path.join(host.REPO, "docs", name), encoding="utf-8") as f:
        return f.read()


def table_rows(text, first, second):
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith(f"| {first} | {second} |")]


def test_short_enough_to_read():
    assert len(README.splitlines()) <= 300


def test_every_link_and_picture_exists():
    targets = re.findall(r"\]\(((?:docs|example_workflows)/[^)#]+)\)", README)
    assert targets
    missing = [t for t in targets if not os.path.exists(os.path.join(host.REPO, t))]
    assert not missing, missing


def test_the_numbers_of_which_node_when_come_from_the_runs_they_cite():
    # "about 0.4-0.5x heun's error": FlowTurbo's median error ratio over heun, oracle and networks
    assert "about 0.4-0.5x heun's error" in README
    (row,) = {tuple(r) for r in table_rows(docs("bench_solvers.md"), "stride_flowturbo", "heun")}
    assert 0.4 <= float(row[3]) < 0.55 and 0.4 <= float(row[5]) < 0.55
    # "beats heun in W of N (L losses, ...)": its wins / ties / losses, oracle and networks together
    counts = [sum(int(c.split("/")[k]) for c in (row[2], row[4])) for k in range(3)]
    assert f"`stride_flowturbo` beats heun in {counts[0]} of {sum(counts)} ({counts[2]} losses" in README
    # "x1.5-1.8 wall time ... ahead of EasyCache at equal error": the caches' equal-error comparison
    assert "x1.5-1.8 wall time" in README
    dits = re.findall(r"DiT (?:8x8|32x32):\s+x(\d\.\d+) at", docs("bench_accel.md").split("## The run")[0])
    assert sorted(round(float(x), 1) for x in dits) == [1.5, 1.8]
    # "beats the best built-in ... on the DiTs at most NFE (W of N), on the UNets in W of N and never at 4-6 NFE"
    best = docs("bench_solvers.md").split("### Best Stride run against the best built-in run")[1].split("###")[0]
    lines = [[c.strip() for c in line.strip("|").split("|")] for line in best.splitlines() if line.startswith("| ")]
    nfes = [int(h.split()[1]) for h in lines[0][2:]]
    cells = {family: [(n, c) for r in lines if r[0].startswith(family + "_") for n, c in zip(nfes, r[2:]) if c]
             for family in ("dit", "unet")}
    wins = {family: [n for n, c in v if c.startswith("**")] for family, v in cells.items()}  # bold: a win
    assert (f"on the DiTs at most NFE ({len(wins['dit'])} of {len(cells['dit'])}), on the UNets in "
            f"{len(wins['unet'])} of {len(cells['unet'])} and never at 4-6 NFE") in " ".join(README.split())
    assert 2 * len(wins["dit"]) > len(cells["dit"]) and min(wins["unet"]) > 6
    # "does not pay" rows and stride_ddim_dualfast's "every setting measured": no loss against euler
    (dual,) = {tuple(r) for r in table_rows(docs("bench_solvers.md"), "stride_ddim_dualfast", "euler")}
    assert dual[2].endswith("/ 0") and dual[4].endswith("/ 0")


def test_the_tested_versions_are_a_range_with_both_ends():
    assert "ComfyUI 0.3.75 through 0.33.0" in README


def test_the_real_width_claims_come_from_the_scale_run():
    import json
    with open(os.path.join(host.REPO, "docs", "bench_scale.json")) as f:
        run = json.load(f)
    assert "at most 0.07% of a model call per step" in README and "bookkeeping at most 3.2%" in README
    light = [r["percent_of_call"] for r in run["overhead"]
             if r["kind"] in ("sampler", "guidance") and r["percent_of_call"] is not None]  # None: the baseline
    caches = [r["percent_of_call"] for r in run["overhead"] if r["kind"] == "cache"]
    assert light and max(light) < 0.075 and caches and round(max(caches), 1) == 3.2
    speed = {}
    for r in run["speedup"]:
        speed.setdefault(r["what"].split(" (")[0] + (" (input change" in r["what"]) * " (input change)", []).append(
            round(r["speedup"], 2))
    assert "x2.0 faster, the cache plan x1.20-1.51, T-Stitch x1.71" in README
    assert {round(s, 1) for s in speed["Stride step cache (input change)"]} == {2.0}
    assert speed["Stride cache plan"] == [1.2, 1.51] and speed["Stride T-Stitch"] == [1.71]
