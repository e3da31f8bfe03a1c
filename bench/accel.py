"""`bench.accel`: cache and stitching accelerators through their nodes, each beside the same uncached sampling in
the same process (docs/bench_accel.md).

    .venv/bin/python -m bench.accel [--quick] [--json PATH] [--tables-from PATH]

For each model setup (a trained demo model at its 8x8 latent, and larger for timing: the DiT at 32x32 and the UNet
at 16x16, where the model's work outweighs the sampler's Python), ComfyUI's euler at cfg 3 draws the ten digits for
each seed. Every method runs on
the same noise and conditioning as the uncached run:
- speed ratio: the uncached run's time over the method's, each the fastest of `repeats` runs taken in turn;
- error: per-image relative L2 distance to the uncached result (mean and worst image);
- skipped: model calls (or block evaluations) the method answered from its cache, read from its own log line.
Methods: Stride's calibrated cache plan (InvarDiff; calibrated on other seeds), Stride's adaptive step cache
(input change; first-block residual on the DiT), ComfyUI's EasyCache and LazyCache, at several thresholds; and
T-Stitch over the fraction of the noise range given to the small model (which reads the large model's
conditioning), with the digit classifier's accuracy beside the large model's.
"""
import json
import logging
import re
import time

import torch

from . import host
from .host import node
from .common import ModelSetup, fresh_calibration_store, parser, write_json

SCHEDULER = {"unet": "karras", "dit": "simple"}
CFG, CAL_SEED = 3.0, 1000
FULL = {"setups": [("dit_large", 8, 20), ("unet_large", 8, 20), ("dit_large", 32, 10), ("unet_large", 16, 10)],
        "seeds": [0, 1], "timing_seeds": [0], "repeats": 2,
        "plan": [(0.2, 0.2), (0.4, 0.3), (0.6, 0.5)], "input": [0.1, 0.2, 0.4], "first_block": [0.1, 0.2, 0.3],
        "easycache": [0.1, 0.2, 0.4], "lazycache": [0.1, 0.2, 0.4],
        "fractions": [0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0]}
QUICK = {**FULL, "setups": [("dit_large", 8, 10)], "seeds": [0], "repeats": 1, "plan": [(0.4, 0.3)],
         "input": [0.2], "first_block": [0.2], "easycache": [0.2], "lazycache": [0.2], "fractions": [0.0, 0.4]}
LOG_PATTERNS = {"Stride": r"Stride [\w -]+: (\d+) of (\d+) model calls answered from the cache"
                          r"(?:, (\d+) of (\d+) block)?",
                "ComfyUI": r"(?:Easy|Lazy)Cache - skipped (\d+)/(\d+) steps",
                "T-Stitch": r"Stride T-Stitch: (\d+) of (\d+) model calls by the small model"}


class LogTail(logging.Handler):
    """The last matching log message per pattern family, while installed."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.last = {}

    def emit(self, record):
        message = record.getMessage()
        for family, pattern in LOG_PATTERNS.items():
            found = re.search(pattern, message)
            if found:
                self.last[family] = found.groups()


class Setup(ModelSetup):
    """A demo model at one latent size and step count: the ten digits for each seed, their noise and conditioning;
    run(model) samples them with ComfyUI's KSampler path."""

    def __init__(self, name, size, steps, seeds):
        super().__init__(name, seeds, size=size)
        self.size, self.steps, self.family = size, steps, name.split("_")[0]

    def run(self, model):
        import comfy.sample
        with torch.inference_mode():
            return comfy.sample.sample(model, self.noise, self.steps, CFG, "euler", SCHEDULER[self.family],
                                       self.positive, self.negative, self.latent, seed=0, disable_pbar=True)


def timed(setup, model, repeats, baseline):
    """(result, seconds of the method, seconds of the uncached run): the fastest of `repeats` runs of each, taken in
    turn (a shared machine only ever slows a run down)."""
    times, base_times, out = [], [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = setup.run(model)
        times.append(time.perf_counter() - start)
        start = time.perf_counter()
        setup.run(baseline)
        base_times.append(time.perf_counter() - start)
    return out, min(times), min(base_times)


def errors(x, reference):
    per_image = ((x - reference).flatten(1).norm(dim=1) / reference.flatten(1).norm(dim=1)).double()
    return per_image.mean().item(), per_image.max().item()


def methods(setup, grid):
    """(method, setting, MODEL) of every cache for this setup; the plan is calibrated here on other seeds."""
    model = setup.model
    step_cache = lambda threshold, indicator: node("StrideStepCache").execute(
        model=model, threshold=threshold, start=0.2, end=0.9, max_hits=2, indicator=indicator).result[0]
    for threshold in grid["input"]:
        yield "Stride step cache (input change)", f"threshold {threshold}", step_cache(threshold, "input change")
    if setup.family == "dit":
        for threshold in grid["first_block"]:
            yield "Stride step cache (first block)", f"threshold {threshold}", step_cache(threshold,
                                                                                         "first block residual")
    calibration = Setup(setup.name, setup.size, setup.steps, [CAL_SEED])
    for quantile, step_quantile in grid["plan"]:
        start = time.perf_counter()
        with torch.inference_mode():
            planned, text = node("StrideCalibrateCachePlan").execute(
                model, calibration.positive, calibration.negative, {"samples": calibration.latent}, "euler",
                SCHEDULER[setup.family], setup.steps, CFG, 10, CAL_SEED, quantile, step_quantile, 0.1).result
        yield ("Stride cache plan (InvarDiff)", f"quantile {quantile}, step {step_quantile} "
               f"(calibrated in {time.perf_counter() - start:.1f} s)", planned)
    for label, node_id, thresholds in (("ComfyUI EasyCache", "EasyCache", grid["easycache"]),
                                       ("ComfyUI LazyCache", "LazyCache", grid["lazycache"])):
        for threshold in thresholds:
            yield label, f"threshold {threshold}", node(node_id).execute(model, threshold, 0.15, 0.95, False).result[0]


def skipped(tail, method):
    if method.startswith("ComfyUI"):
        hits, total = tail.last.get("ComfyUI", (None, None))
        return f"{hits}/{total} steps" if hits is not None else "?"
    got = tail.last.get("Stride")
    if not got:
        return "?"
    calls = f"{got[0]}/{got[1]} calls"
    return calls + (f", {got[2]}/{got[3]} blocks" if got[2] is not None else "")


def measure_caches(setup, grid, tail, log):
    baseline = setup.model
    reference = setup.run(baseline)
    rows = []
    for method, setting, model in methods(setup, grid):
        tail.last.clear()
        x, seconds, base_seconds = timed(setup, model, grid["repeats"], baseline)
        mean, worst = errors(x, reference)
        rows.append({"model": f"{setup.name} {setup.size}x{setup.size}", "steps": setup.steps, "method": method,
                     "setting": setting, "skipped": skipped(tail, method), "speed": base_seconds / seconds,
                     "error": mean, "worst": worst})
        log(f"  {rows[-1]['model']:<18} {method:<34} {setting:<44} {rows[-1]['skipped']:<24} "
              f"x{rows[-1]['speed']:.2f}  err {mean:.4f} (worst {worst:.4f})")
    return rows


def accuracy(classifier, x, setup):
    """The digit classifier's accuracy (it reads 8x8 latents: None at other sizes)."""
    return round(classifier.accuracy(x.float(), setup.labels), 3) if setup.size == 8 else None


def measure_stitch(setup, grid, tail, classifier, log):
    """T-Stitch with the small sibling reading the large model's conditioning: speed, error to the large model's
    result and digit accuracy, per fraction of the noise range given to the small model."""
    small_name = setup.name.replace("_large", "_small")
    small = node("StrideDemoModel").execute(small_name, "0123456789", 1, 1.0, False, "large sibling's").result[0]
    reference = setup.run(setup.model)
    rows = []
    for fraction in grid["fractions"]:
        tail.last.clear()
        stitched = node("StrideTStitch").execute(setup.model, small, fraction).result[0]
        x, seconds, base_seconds = timed(setup, stitched, grid["repeats"], setup.model)
        mean, worst = errors(x, reference)
        got = tail.last.get("T-Stitch", ("?", "?"))
        rows.append({"model": f"{setup.name} {setup.size}x{setup.size}", "steps": setup.steps, "fraction": fraction,
                     "small_calls": f"{got[0]}/{got[1]}", "speed": base_seconds / seconds, "error": mean,
                     "worst": worst, "accuracy": accuracy(classifier, x, setup),
                     "large_accuracy": accuracy(classifier, reference, setup)})
        log(f"  T-Stitch {setup.name} {setup.size}x{setup.size} fraction {fraction:.1f}: {rows[-1]['small_calls']} "
            f"small calls, x{rows[-1]['speed']:.2f}, err {mean:.4f}, accuracy {rows[-1]['accuracy']} "
            f"(large {rows[-1]['large_accuracy']})")
    return rows


def cache_table(rows):
    lines = ["| model | steps | method | setting | skipped | speed ratio | error (mean) | error (worst image) |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['steps']} | {r['method']} | {r['setting']} | {r['skipped']} | "
              f"x{r['speed']:.2f} | {r['error']:.4f} | {r['worst']:.4f} |" for r in rows]
    return "\n".join(lines)


def cell(value):
    return "n/a (the classifier reads 8x8)" if value is None else f"{value:.3f}"


def stitch_table(rows):
    lines = ["| model | steps | fraction to the small model | small-model calls | speed ratio | error (mean) | "
             "accuracy | large model's accuracy |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['steps']} | {r['fraction']:.1f} | {r['small_calls']} | x{r['speed']:.2f} | "
              f"{r['error']:.4f} | {cell(r['accuracy'])} | {cell(r['large_accuracy'])} |" for r in rows]
    return "\n".join(lines)


def best_at_equal_error(rows):
    """Per model: for each cache of Stride, the fastest setting whose mean error is at most that of EasyCache's
    setting (the speed ratios compared at equal or lower error)."""
    lines = ["| model | EasyCache setting | its error | its speed | Stride's fastest at <= that error | error | "
             "speed |",
             "|---|---|---|---|---|---|---|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        ours = [r for r in rows if r["model"] == model and r["method"].startswith("Stride")]
        for easy in [r for r in rows if r["model"] == model and r["method"] == "ComfyUI EasyCache"]:
            fit = [r for r in ours if r["error"] <= easy["error"]]
            best = max(fit, key=lambda r: r["speed"]) if fit else None
            lines.append(f"| {model} | {easy['setting']} | {easy['error']:.4f} | x{easy['speed']:.2f} | "
                         + (f"{best['method']}, {best['setting']} | {best['error']:.4f} | x{best['speed']:.2f} |"
                            if best else "none | | |"))
    return "\n".join(lines)


def measure(grid, log=print):
    """(cache rows, T-Stitch rows) of the grid, in a fresh calibration store."""
    classifier = host.stride("demo.classifier").load()
    tail = LogTail()
    root = logging.getLogger()
    level = root.level
    root.addHandler(tail)
    root.setLevel(logging.INFO)
    caches, stitches = [], []
    try:
        with fresh_calibration_store():
            for name, size, steps in grid["setups"]:
                setup = Setup(name, size, steps, grid["seeds"] if size == 8 else grid["timing_seeds"])
                log(f"{name} {size}x{size}, {steps} euler steps, {len(setup.labels)} images")
                caches += measure_caches(setup, grid, tail, log)
                if grid["fractions"]:
                    stitches += measure_stitch(setup, grid, tail, classifier, log)
    finally:
        root.removeHandler(tail)
        root.setLevel(level)
    return caches, stitches


ANCHORS = [("Stride cache plan (InvarDiff)", "InvarDiff paper: 2.5-3.3x on FLUX.1-dev (28 steps), 2.86x on DiT-XL/2"),
           ("Stride step cache (first block)", "First Block Cache: about 1.9x on FLUX (28 steps, threshold 0.12)"),
           ("ComfyUI EasyCache", "EasyCache paper: 2-3x on video models")]


def anchors(caches, stitches):
    """The papers' numbers as quoted, beside the measured range of each method."""
    lines = []
    for method, quote in ANCHORS:
        rows = [r for r in caches if r["method"] == method]
        if rows:
            lines.append(f"- {quote}; measured here (CPU, demo models): x{min(r['speed'] for r in rows):.2f} .. "
                         f"x{max(r['speed'] for r in rows):.2f} at mean error {min(r['error'] for r in rows):.4f} .. "
                         f"{max(r['error'] for r in rows):.4f}")
    near = [r for r in stitches if abs(r["fraction"] - 0.4) < 1e-9]
    if near:
        measured = "; ".join(f"{r['model']} x{r['speed']:.2f}, accuracy {cell(r['accuracy'])} (large "
                             f"{cell(r['large_accuracy'])})" for r in near)
        lines.append("- T-Stitch paper: about 40% of DiT-XL's steps given to DiT-S with no FID loss (reviews: "
                     "1.5-1.7x); measured here at fraction 0.4: " + measured)
    return "\n".join(lines)


def report(caches, stitches):
    print("\n## Anchors (the papers' numbers as quoted, beside the measured ones)\n\n" + anchors(caches, stitches))
    print("\n## Caches: speed ratio and error to the uncached result\n\n" + cache_table(caches))
    print("\n## Stride's caches at EasyCache's error\n\n" + best_at_equal_error(caches))
    print("\n## T-Stitch over the fraction of the noise range\n\n" + stitch_table(stitches))


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--tables-from", metavar="PATH", help="reprint the tables of an earlier --json run")
    args = p.parse_args()
    if args.tables_from:
        with open(args.tables_from) as f:
            data = json.load(f)
        return report(data["caches"], data["stitch"])
    host.boot()
    start = time.perf_counter()
    caches, stitches = measure(QUICK if args.quick else FULL, log=lambda line: print(line, flush=True))
    report(caches, stitches)
    print(f"\n{time.perf_counter() - start:.0f} s in all")
    write_json(args.json, {"caches": caches, "stitch": stitches, "grid": {k: str(v) for k, v in FULL.items()}})


if __name__ == "__main__":
    main()
