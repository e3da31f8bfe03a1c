"""bench.scale in its quick mode, through the GPU mode's code path (full-depth SDXL layout at a tiny width, on this
CPU): every Stride sampler, guidance patch and cache gets an overhead row against ComfyUI's euler, every
accelerator a finite speedup and its cached bytes, and the report prints every row."""
import math

from bench import scale


def test_quick_gpu_mode_fills_every_table(stride):
    mode = scale.mode_for(gpu=True, quick=True)
    result = scale.measure(mode, log=lambda _: None)
    assert [m["model"].split(" (")[0] for m in result["models"]] == ["SDXL UNet", "Flux DiT"]
    assert all(m["call_ms"] > 0 and m["params"] > 0 for m in result["models"])
    for model in ("SDXL UNet", "Flux DiT"):
        rows = [r for r in result["overhead"] if r["model"].startswith(model)]
        samplers = {r["what"] for r in rows if r["kind"] == "sampler"}
        assert {f"sampler {name}" for name in scale.SAMPLERS} <= samplers
        assert any(r["kind"] == "guidance" for r in rows) and any(r["kind"] == "cache" for r in rows)
        assert all(math.isfinite(r["ms_per_step"]) for r in rows)
        calls = {r["what"]: r["calls"] for r in rows if r["kind"] == "sampler"}
        assert calls["sampler stride_dpmpp_2m"] == 0 and calls["sampler stride_flowturbo"] == 2  # its Heun steps
        caches = [r for r in rows if r["kind"] == "cache"]
        assert all(r["cached_bytes_per_image"] > 0 for r in caches)  # the wrapper really stored something
    speed = result["speedup"]
    assert {r["what"].split(" (")[0] for r in speed} == {"Stride step cache", "Stride cache plan", "Stride T-Stitch"}
    assert all(r["speedup"] > 0 and math.isfinite(r["speedup"]) for r in speed)
    table = scale.report(result)
    assert table.count("\n|") >= len(result["overhead"]) + len(speed) + len(result["models"])
