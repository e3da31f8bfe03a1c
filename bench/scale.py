"""`bench.scale`: Stride's cost and gains at real model widths, beside ComfyUI's own samplers in one process
(docs/bench_scale.md).

    .venv/bin/python -m bench.scale [--quick] [--gpu] [--json PATH]

Models: ComfyUI's SDXL UNet (model channels 320, context 2048) and Flux DiT (hidden 3072, 24 heads) built through
`comfy.supported_models` at their real width with random weights (so only speed and memory mean anything here:
quality claims stay with the trained demo models), bf16 where the CPU has bf16 instructions. On the CPU the depth is
reduced (SDXL: one res block a level, one transformer layer; Flux: one double and one single block) at 512x512
(64x64 latents); `--gpu` builds both at full depth (SDXL 2/2/2 res
blocks with 10-deep transformers, Flux-dev's 19 + 38 blocks) at 1024x1024 (128x128 latents) on CUDA. `--quick`
shrinks whichever mode to a tiny width and latent (CI runs it on the CPU, and the GPU mode's code path with it).

Measured, each beside the same run without Stride in the same process:
- overhead per step: of each Stride sampler (by its stride_* name) and guidance patch, against ComfyUI's euler,
  with the network's forward skipped (a DIFFUSION_MODEL wrapper answers for it), so what remains is the sampling
  path itself; of each cache's bookkeeping when nothing is reused (the input-change cache with the forward
  skipped too, the first-block cache inside the real network's blocks). Given in ms per step and in percent of one
  real model call.
- wall-time speedup of the step cache, the first-block cache, the cache plan and T-Stitch (a shallower sibling of
  the same width) at fixed reuse settings, and the bytes of cached tensors each holds per image.
"""
import time

import torch

from . import host
from .host import node
from .common import fresh_calibration_store, parser, write_json

SAMPLERS = ["stride_dpmpp_2m", "stride_dpmpp_3m", "stride_unipc", "stride_unipc_bh2", "stride_ddim_dualfast",
            "stride_dpmpp_2m_dualfast", "stride_dpmpp_2m_hb", "stride_plms_hb", "stride_ghvb", "stride_dpmpp_2m_ts",
            "stride_flowturbo"]
# per mode: SDXL (depth, latent side, text tokens, steps), Flux (blocks, small sibling's blocks, latent side, text
# tokens, steps), the width, and how many times each run is taken (the fastest counts): `repeats` for runs with the
# forward skipped, `real_repeats` for runs of the real network
SIZES = {
    "cpu": {"sdxl": ("reduced", 64, 77, 6), "flux": ((1, 1), (1, 0), 64, 256, 6), "width": "real", "repeats": 3,
            "real_repeats": 2},
    "gpu": {"sdxl": ("full", 128, 77, 8), "flux": ((19, 38), (6, 12), 128, 512, 8), "width": "real", "repeats": 3,
            "real_repeats": 2},
    "quick": {"sdxl": ("reduced", 16, 8, 3), "flux": ((1, 1), (1, 0), 16, 8, 3), "width": "tiny", "repeats": 1,
              "real_repeats": 1},
}


def sdxl_config(depth, width):
    config = {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320, "channel_mult": [1, 2, 4],
              "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
              "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "transformer_depth_middle": 10,
              "context_dim": 2048, "adm_in_channels": 2816, "num_head_channels": 64,
              "use_linear_in_transformer": True, "use_spatial_transformer": True, "legacy": False,
              "num_classes": "sequential", "use_checkpoint": False, "use_temporal_attention": False,
              "use_temporal_resblock": False}
    if depth == "reduced":  # one res block a level, one transformer layer where SDXL has them
        config.update(num_res_blocks=[1, 1, 1], transformer_depth=[0, 1, 1], transformer_depth_middle=1,
                      transformer_depth_output=[0, 0, 1, 1, 1, 1])
    if width == "tiny":  # the same layout, narrow
        config.update(model_channels=64, context_dim=64)
    return config


def flux_config(blocks, width, compat):
    double, single = blocks
    config = {"image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16, "vec_in_dim": 768,
              "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": double,
              "depth_single_blocks": single, "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2,
              "qkv_bias": True}
    if width == "tiny":
        config.update(hidden_size=64, num_heads=2, axes_dim=[8, 12, 12], context_in_dim=64, vec_in_dim=32)
    return compat.flux_unet_config(config)


def device_name(device):
    """The card by name on CUDA (the GPU tables name it), else the device type."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)


def dtype_for(device):
    """bf16 where the device computes it natively (CUDA, or a CPU with bf16 instructions), else float32."""
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX") else torch.float32


class Bench:
    """One architecture at one size: its ModelPatcher, conditioning and latent."""

    def __init__(self, kind, mode, size, blocks=None):
        import comfy.model_management as mm
        import comfy.model_patcher
        import comfy.supported_models
        from .families import init_weights
        compat = host.stride("nodes.compat")
        self.kind, self.device = kind, mm.get_torch_device()
        self.dtype = dtype_for(self.device)
        if kind == "sdxl":
            depth, self.side, tokens, self.steps = size
            config = comfy.supported_models.SDXL(sdxl_config(depth, mode["width"]))
            self.label = f"SDXL UNet ({depth} depth, {'width 64' if mode['width'] == 'tiny' else 'width 320'})"
            context = config.unet_config["context_dim"]
            self.extras = lambda b: {"pooled_output": torch.randn(b, 1280), "width": 1024, "height": 1024}
            self.cfg = 5.0
        else:
            blocks = blocks or size[0]
            _, _, self.side, tokens, self.steps = size
            config = comfy.supported_models.Flux(flux_config(blocks, mode["width"], compat))
            hidden = config.unet_config["hidden_size"]
            self.label = f"Flux DiT ({blocks[0]}+{blocks[1]} blocks, hidden {hidden})"
            context = config.unet_config["context_in_dim"]
            vec = config.unet_config["vec_in_dim"]
            self.extras = lambda b: {"pooled_output": torch.randn(b, vec), "guidance": 3.5}
            self.cfg = 1.0  # guidance-distilled: one pass a step
        config.set_inference_dtype(self.dtype, None)
        base = config.get_model({}, "", device=torch.device("cpu"))
        torch.manual_seed(0)
        init_weights(base.diffusion_model, 0)
        base.diffusion_model.to(self.dtype)
        self.params = sum(p.numel() for p in base.diffusion_model.parameters())
        self.bytes = sum(p.numel() * p.element_size() for p in base.diffusion_model.parameters())
        self.model = comfy.model_patcher.ModelPatcher(base, load_device=self.device, offload_device=mm.unet_offload_device())
        channels = config.latent_format.latent_channels
        self.latent = torch.zeros(1, channels, self.side, self.side)
        torch.manual_seed(1)
        self.positive = [[torch.randn(1, tokens, context), self.extras(1)]]
        self.negative = [[torch.zeros(1, tokens, context), self.extras(1)]]
        self.size_note = f"{self.side}x{self.side} latent ({8 * self.side}x{8 * self.side} image), {str(self.dtype)[6:]}"

    def run(self, model, sampler="euler", scheduler="simple"):
        """Seconds of one sampling run (the result is discarded)."""
        import comfy.sample
        noise = comfy.sample.prepare_noise(self.latent, 0)
        start = time.perf_counter()
        with torch.inference_mode():
            comfy.sample.sample(model, noise, self.steps, self.cfg, sampler, scheduler, self.positive, self.negative,
                                self.latent, seed=0, disable_pbar=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def paired(self, base, other, repeats, sampler="euler", warm=False):
        """(fastest base run, fastest run of other), taken in turn so both see the same machine load; warm: one
        untimed run of each first (the first run after another patched model loads is often slower)."""
        if warm:
            self.run(base), self.run(other, sampler=sampler)
        times = [(self.run(base), self.run(other, sampler=sampler)) for _ in range(repeats)]
        return min(t[0] for t in times), min(t[1] for t in times)


def forward_skipped(model):
    """A clone whose network forward is answered at once (same shape): the sampling path alone remains."""
    import comfy.patcher_extension
    clone = model.clone()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "bench_skip",
                               lambda executor, x, *args, **kwargs: x * 0.5)
    return clone


def call_seconds(bench):
    """Mean seconds of one real model call (counted inside the model)."""
    counted, counter = host.stride("nodes.counting").count_model_calls(bench.model)
    bench.run(counted)  # warm
    counter.reset()
    bench.run(counted)
    return counter.seconds / max(counter.cond, 1)


def cache_of(model):
    """The Stride cache runtime behind a patched model (its APPLY_MODEL wrapper's owner)."""
    import comfy.patcher_extension
    for fns in model.wrappers[comfy.patcher_extension.WrappersMP.APPLY_MODEL].values():
        owner = getattr(fns[-1], "__self__", None)
        if hasattr(owner, "last_run"):
            return owner
    return None


def cached_bytes(model):
    """Bytes of tensors the model's cache holds after its last run."""
    cache = cache_of(model)
    run = cache and cache.last_run
    if run is None:
        return 0
    values = list(run.slopes.values()) + [v for s in run.stored.values() for v in (s.values() if isinstance(s, dict)
                                                                                  else [s])]
    return sum(v.numel() * v.element_size() for v in values if torch.is_tensor(v))


def overheads(bench, call, repeats, real_repeats, log):
    """Rows: ms per step over ComfyUI's euler, and percent of one model call."""
    skipped, counter = host.stride("nodes.counting").count_model_calls(forward_skipped(bench.model))
    counter.reset()
    rows = [{"model": bench.label, "what": "ComfyUI euler (the baseline: its whole sampling path)", "kind": "sampler",
             "ms_per_step": 1e3 * min(bench.run(skipped) for _ in range(repeats)) / bench.steps,
             "percent_of_call": None, "calls": counter.cond // repeats}]
    base_calls = rows[0]["calls"]
    guidance = [("Stride CFG schedule (constant)", node("StrideCFGSchedule").execute(
        skipped, "constant", 0.2, 0.8, 1.0, "", "progress").result[0])]
    if bench.cfg > 1:
        guidance.append(("Stride RAAG", node("StrideRAAG").execute(skipped, bench.cfg, 144.0).result[0]))
    runs = [(name, "sampler", skipped, name) for name in ["dpmpp_2m"] + SAMPLERS]
    runs += [(label, "guidance", model, "euler") for label, model in guidance]
    for what, kind, model, sampler in runs:
        counter.reset()
        base, seconds = bench.paired(skipped, model, repeats, sampler)
        over = (seconds - base) / bench.steps
        rows.append({"model": bench.label, "what": what if kind == "guidance" else f"sampler {what}", "kind": kind,
                     "ms_per_step": 1e3 * over, "percent_of_call": 100 * over / call,
                     "calls": counter.cond // repeats - 2 * base_calls})  # the pair ran euler too
        log(f"  {bench.label}: {rows[-1]['what']}: {1e3 * over:+.2f} ms/step ({rows[-1]['percent_of_call']:+.2f}%)")
    # the input-change cache keeps all its bookkeeping outside the network (an APPLY_MODEL wrapper): measured with
    # the forward skipped, like the samplers; the first-block cache works inside the blocks: with the real network
    caches = [("Stride step cache (input change), nothing reused", skipped, repeats,
               node("StrideStepCache").execute(skipped, 0.0, 0.0, 1.0, 1, "input change").result[0])]
    if bench.kind == "flux":
        caches.append(("Stride step cache (first block residual), nothing reused", bench.model, real_repeats,
                       node("StrideStepCache").execute(bench.model, 0.0, 0.0, 1.0, 1,
                                                         "first block residual").result[0]))
    for what, base_model, n, model in caches:
        plain, seconds = bench.paired(base_model, model, n, warm=base_model is bench.model)
        over = (seconds - plain) / bench.steps
        rows.append({"model": bench.label, "what": what, "kind": "cache", "ms_per_step": 1e3 * over,
                     "percent_of_call": 100 * over / call, "cached_bytes_per_image": cached_bytes(model)})
        log(f"  {bench.label}: {what}: {1e3 * over:+.2f} ms/step ({rows[-1]['percent_of_call']:+.2f}%)")
    return rows


def speedups(bench, small, repeats, log):
    """Rows: wall-time speedup and cached bytes per image of each accelerator at a fixed reuse setting."""
    step = node("StrideStepCache").execute(bench.model, 5.0, 0.0, 1.0, 1, "input change").result[0]
    methods = [("Stride step cache (input change: every other call reused)", step)]
    if bench.kind == "flux":
        methods.append(("Stride step cache (first block residual: other blocks reused every other call)",
                        node("StrideStepCache").execute(bench.model, 5.0, 0.0, 1.0, 1,
                                                          "first block residual").result[0]))
    with fresh_calibration_store():
        with torch.inference_mode():
            planned = node("StrideCalibrateCachePlan").execute(
                bench.model, bench.positive, bench.negative, {"samples": bench.latent}, "euler", "simple",
                bench.steps, bench.cfg, 1, 0, 0.5, 0.3, 0.1).result[0]
        methods.append(("Stride cache plan (InvarDiff, quantiles 0.5 / 0.3)", planned))
        if small is not None:
            methods.append((f"Stride T-Stitch (fraction 0.4, small sibling {small.label})",
                            node("StrideTStitch").execute(bench.model, small.model, 0.4).result[0]))
        rows = []
        for what, model in methods:
            plain, seconds = bench.paired(bench.model, model, repeats, warm=True)
            rows.append({"model": bench.label, "what": what, "speedup": plain / seconds,
                         "cached_bytes_per_image": cached_bytes(model)})
            log(f"  {bench.label}: {what}: x{plain / seconds:.2f}")
    return rows


def measure(mode, log=print):
    repeats = mode["repeats"]
    result = {"overhead": [], "speedup": [], "models": []}
    for kind in ("sdxl", "flux"):
        bench = Bench(kind, mode, mode[kind])
        small = Bench(kind, mode, mode[kind], blocks=mode[kind][1]) if kind == "flux" else None
        call = call_seconds(bench)
        result["models"].append({"model": bench.label, "size": bench.size_note, "params": bench.params,
                                 "call_ms": 1e3 * call, "steps": bench.steps, "device": device_name(bench.device)})
        log(f"{bench.label}, {bench.size_note}: {bench.params / 1e6:.0f} M parameters, one call {1e3 * call:.0f} ms")
        result["overhead"] += overheads(bench, call, repeats, mode["real_repeats"], log)
        result["speedup"] += speedups(bench, small, mode["real_repeats"], log)
    return result


def calls(row):
    """Model calls of the run: euler's count, others as the difference from it."""
    if row.get("calls") is None:
        return "same as uncached"
    return str(row["calls"]) if row["kind"] == "sampler" and row["what"].startswith("ComfyUI euler") \
        else f"{row['calls']:+d}"


def fmt(value, spec):
    return "n/a" if value is None else format(value, spec)


def report(result):
    lines = ["## Models\n", "| model | size | parameters | one call (ms) | steps | device |", "|---|---|---|---|---|---|"]
    lines += [f"| {m['model']} | {m['size']} | {m['params'] / 1e6:.1f} M | {m['call_ms']:.0f} | {m['steps']} | "
              f"{m['device']} |" for m in result["models"]]
    lines += ["", "## Overhead per step (over ComfyUI's euler on the same model)\n",
              "| model | what | model calls a run | ms per step | % of one model call | cached bytes per image |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['what']} | {calls(r)} | {fmt(r['ms_per_step'], '+.2f')} | "
              f"{fmt(r['percent_of_call'], '+.2f')} | {r.get('cached_bytes_per_image', '')} |" for r in result["overhead"]]
    lines += ["", "Samplers, guidance and the input-change cache ran with the network's forward skipped: their rows "
              "are their own cost on the sampling path (the cache's row: its bookkeeping when nothing is reused); the "
              "first-block cache ran with the real network (its bookkeeping lives inside the blocks), so its row "
              "also holds the run-to-run noise of two real runs. "
              "A sampler that makes more model calls than euler (FlowTurbo's Heun steps) pays ComfyUI's per-call "
              "path for them too; with the real network each extra call costs a whole model call."]
    lines += ["", "## Speedup at a fixed reuse setting (wall time of the uncached run over the method's)\n",
              "| model | method | speedup | cached bytes per image |", "|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['what']} | x{r['speedup']:.2f} | {r['cached_bytes_per_image']} |"
              for r in result["speedup"]]
    print("\n".join(lines))
    return "\n".join(lines)


def mode_for(gpu, quick):
    """The sizes of a run: --quick shrinks the CPU or the GPU mode (the GPU mode keeps its full depth)."""
    if quick:
        return {**SIZES["quick"], "sdxl": ("full",) + SIZES["quick"]["sdxl"][1:]} if gpu else SIZES["quick"]
    return SIZES["gpu" if gpu else "cpu"]


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="full-depth models at 1024x1024 on CUDA")
    args = p.parse_args()
    host.boot(cpu=not args.gpu)
    torch.set_num_threads(torch.get_num_threads() if args.gpu else 2)
    mode = mode_for(args.gpu, args.quick)
    start = time.perf_counter()
    result = measure(mode, log=lambda line: print(line, flush=True))
    result["seconds"] = time.perf_counter() - start
    report(result)
    print(f"\n{result['seconds']:.0f} s in all")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
