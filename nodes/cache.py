"""Cache accelerators in ComfyUI: the runtime that answers model calls (APPLY_MODEL wrapper) and blocks (Flux-style
DiT blocks through patches_replace "dit", UNet attention through "attn1"/"attn2" replacements) from what earlier
calls computed, driven by a policy from samplers/cache.py: a calibrated InvarDiff plan or an adaptive reuse test.
State is kept per chunk (cond/uncond set and shape), reset at the start of every run (OUTER_SAMPLE), and each run
logs its reuse and time."""
import json
import logging
import time

import torch

import comfy.ldm.modules.attention
import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.utils
from comfy_api.latest import io

from ..samplers.cache import Plan, RateMeter, ReuseTest, fit_plan, rel_l1
from . import calibration_store as store
from .calibration import conditioning_digest
from .guidance import progress

WrappersMP = comfy.patcher_extension.WrappersMP


def units_of(model):
    """[(unit name, family, (patch kind, key))] of what ComfyUI lets Stride replace: a Flux-style DiT's double and
    single blocks ("dit" patches) and the attention inside each (ComfyUI's optimized_attention_override, told apart
    by the block type and index ComfyUI sets), a UNet's self- and cross-attention ("attn1"/"attn2" replacements).
    Other architectures: [] (step-level reuse only)."""
    net = model.model.diffusion_model
    if hasattr(net, "double_blocks") and hasattr(net, "single_blocks"):
        blocks = [(kind, i) for kind, stack in (("double", net.double_blocks), ("single", net.single_blocks))
                  for i in range(len(stack))]
        return ([(f"{kind}_block.{i}", kind, ("dit", (f"{kind}_block", i))) for kind, i in blocks]
                + [(f"attn.{kind}_block.{i}", "attn", ("attention", (kind, i))) for kind, i in blocks])
    units = []
    if hasattr(net, "input_blocks") and hasattr(net, "output_blocks"):
        for name, blocks in (("input", net.input_blocks), ("middle", [net.middle_block]), ("output", net.output_blocks)):
            for number, block in enumerate(blocks):
                for module in block.modules():
                    for j in range(len(getattr(module, "transformer_blocks", []))
                                   if type(module).__name__ == "SpatialTransformer" else 0):
                        for attn in ("attn1", "attn2"):
                            units.append((f"{attn}.{name}.{number}.{j}", attn, (attn, (name, number, j))))
    return units


def chunk_of(transformer_options, x):
    """What a cache entry belongs to: the cond/uncond set, the conditionings (ComfyUI's uuids) and the shape."""
    return (tuple(transformer_options.get("cond_or_uncond", [])), tuple(map(str, transformer_options.get("uuids", []))),
            tuple(x.shape))


class Cache:
    """The runtime: policy.step(cache, chunk, x, sigma, progress) -> reuse the whole call (the last ODE slope of the
    chunk, D = x - sigma d); policy.unit(cache, unit) -> reuse a unit's stored output (a block's residual,
    an attention output). A recorder (`meter`, samplers.cache.RateMeter) sees every unit's and call's output
    instead, and nothing is reused."""

    def __init__(self, name, units, policy=None, meter=None):
        self.name, self.units, self.policy, self.meter = name, units, policy, meter
        self.reset()

    def reset(self):
        self.slopes, self.stored, self.index, self.call_sigmas = {}, {}, {}, []
        self.calls = self.call_hits = self.unit_calls = self.unit_hits = 0
        self.seconds, self.full_seconds, self.full_calls = 0.0, 0.0, 0
        self.current = None
        if self.policy is not None:
            self.policy.reset()

    def patch(self, model, key):
        patched = model.clone()
        patched.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, key, self.outer)
        patched.add_wrapper_with_key(WrappersMP.APPLY_MODEL, key, self.apply_model)
        options = patched.model_options.setdefault("transformer_options", {})
        attention = {where: unit for unit, _, (kind, where) in self.units if kind == "attention"}
        if attention and "optimized_attention_override" in options:
            logging.warning("Stride %s: another node overrides the attention; the attention outputs are not cached",
                            self.name)
        elif attention:
            options["optimized_attention_override"] = self.attention_override(attention)
        replaced = options.get("patches_replace", {})
        for unit, _, (kind, where) in self.units:
            if kind == "attention":
                continue
            if where in replaced.get(kind, {}):
                logging.warning("Stride %s: %s already has a replacement from another node; left to it", self.name,
                                unit)
                continue
            patched.set_model_patch_replace(self.block(unit) if kind == "dit" else self.attention(unit), kind, *where)
        return patched

    def outer(self, executor, *args, **kwargs):
        self.reset()
        try:
            return executor(*args, **kwargs)
        finally:
            if self.calls and self.meter is None:
                self.log()

    def log(self):
        full = self.full_seconds / max(self.full_calls, 1)
        speedup = f"x{full * self.calls / self.seconds:.2f} measured" if self.full_calls and self.seconds else "n/a"
        blocks = (f", {self.unit_hits} of {self.unit_calls} block evaluations reused" if self.unit_calls else "")
        blocks += getattr(self.policy, "report", lambda: "")()
        logging.info("Stride %s: %d of %d model calls answered from the cache%s; %.2f s in the model, speedup %s "
                     "(against %d calls at the full calls' mean time)", self.name, self.call_hits, self.calls, blocks,
                     self.seconds, speedup, self.calls)

    def apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                    **kwargs):
        chunk = chunk_of(transformer_options, x)
        sigma = float(t.max())
        index = self.index.get(chunk, 0)
        self.index[chunk] = index + 1
        if chunk == next(iter(self.index)):  # the sigmas of the run's calls, as the first chunk saw them
            self.call_sigmas.append(sigma)
        p = progress(executor.class_obj.model_sampling, sigma)
        self.current = {"chunk": chunk, "index": index, "progress": p, "reused": 0, "skip_rest": False,
                        "sample_sigmas": transformer_options.get("sample_sigmas")}
        sigma_b = t.reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype)
        self.calls += 1
        if self.policy is not None and self.policy.step(self, chunk, x, sigma, p) and chunk in self.slopes:
            self.call_hits += 1
            return x - sigma_b * self.slopes[chunk]
        start = time.perf_counter()
        out = executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        elapsed = time.perf_counter() - start
        self.seconds += elapsed
        if self.current["reused"] == 0:
            self.full_seconds, self.full_calls = self.full_seconds + elapsed, self.full_calls + 1
        slope = (x - out) / sigma_b
        if self.meter is not None:
            self.meter.update(chunk, index, "step", slope)
        self.slopes[chunk] = slope
        if self.policy is not None:
            self.policy.computed(self, chunk, x)
        return out

    def _reuse(self, unit, stored, fits):
        """Whether this unit answers from its store in the current call (counted)."""
        self.unit_calls += 1
        if stored is None or not fits or self.policy is None or not self.policy.unit(self, unit):
            return False
        self.unit_hits += 1
        self.current["reused"] += 1
        return True

    def _record(self, unit, value):
        self.stored[(self.current["chunk"], unit)] = value
        if self.meter is not None:
            flat = torch.cat([v.flatten() for v in value.values()]) if isinstance(value, dict) else value
            self.meter.update(self.current["chunk"], self.current["index"], unit, flat)

    def block(self, unit):
        """A "dit" block replacement: reuse the block's residuals (out - in of every stream) or run the block."""
        def replace(args, extra):
            stored = self.stored.get((self.current["chunk"], unit))
            fits = stored is not None and all(k in args and args[k].shape == v.shape for k, v in stored.items())
            if self._reuse(unit, stored, fits):
                return {**{k: args[k] for k in ("img", "txt") if k in args},
                        **{k: args[k] + v for k, v in stored.items()}}
            # ComfyUI's blocks add to their inputs in place: keep the inputs to take the residuals
            inputs = {k: v.clone() for k, v in args.items() if k in ("img", "txt") and torch.is_tensor(v)}
            out = extra["original_block"](args)
            residual = {k: v - inputs[k] for k, v in out.items() if k in inputs and inputs[k].shape == v.shape}
            self._record(unit, residual)
            if self.policy is not None:
                self.policy.block_done(self, unit, residual)
            return out
        return replace

    def attention_override(self, units):
        """ComfyUI's attention override: reuse the attention output of a planned DiT block, or compute it."""
        def override(func, *args, **kwargs):
            options = kwargs.get("transformer_options") or {}
            unit = units.get((options.get("block_type"), options.get("block_index")))
            if unit is None or self.current is None:
                return func(*args, **kwargs)
            stored = self.stored.get((self.current["chunk"], unit))
            if self._reuse(unit, stored, stored is not None):  # the chunk fixes the shapes
                return stored
            out = func(*args, **kwargs)
            self._record(unit, out)
            return out
        return override

    def attention(self, unit):
        """An "attn1"/"attn2" replacement: reuse the attention output or compute it as ComfyUI does."""
        def replace(q, k, v, extra_options):
            stored = self.stored.get((self.current["chunk"], unit))
            if self._reuse(unit, stored, stored is not None and stored.shape == q.shape):
                return stored
            out = comfy.ldm.modules.attention.optimized_attention(q, k, v, extra_options["n_heads"],
                                                                  attn_precision=extra_options.get("attn_precision"))
            self._record(unit, out)
            return out
        return replace


class PlanPolicy:
    """A calibrated plan (samplers.cache.Plan): a call is matched to the plan's calls by its sigma, in order per
    chunk (so split sigma lists and two-call-per-step samplers line up); unmatched calls compute in full."""

    def __init__(self, plan, call_sigmas):
        self.plan, self.call_sigmas = plan, call_sigmas
        self.reset()

    def reset(self):
        self.pointer, self.unmatched, self.fits = {}, 0, None

    def known(self, sigma):
        return any(abs(s - sigma) <= 1e-4 * max(abs(sigma), 1e-3) for s in self.call_sigmas)

    def match(self, chunk, sigma, sample_sigmas):
        if self.fits is None:  # the run's schedule: every step's sigma must be one the plan was made on
            self.fits = sample_sigmas is None or all(self.known(float(s)) for s in sample_sigmas if float(s) > 0)
        for j in range(self.pointer.get(chunk, 0), len(self.call_sigmas) if self.fits else 0):
            if abs(self.call_sigmas[j] - sigma) <= 1e-4 * max(abs(sigma), 1e-3):
                self.pointer[chunk] = j + 1
                return j
        self.unmatched += 1
        return None

    def report(self):
        return (f"; {self.unmatched} calls not in the plan ran in full (the plan was made for another sampler or "
                "schedule)" if self.unmatched else "")

    def step(self, cache, chunk, x, sigma, p):
        t = self.match(chunk, sigma, cache.current["sample_sigmas"])
        cache.current["plan_index"] = t
        return t is not None and bool(self.plan.gate[t])

    def unit(self, cache, unit):
        t = cache.current.get("plan_index")
        return t is not None and self.plan.cached(t, unit)

    def computed(self, cache, chunk, x):
        pass

    def block_done(self, cache, unit, residual):
        pass


class AdaptivePolicy:
    """No calibration (samplers.cache.ReuseTest): indicator "input" = the model input's relative change, accumulated
    since the last computed call, decides whole calls; "first_block" = the first block's residual against its last
    computed value decides whether the other blocks reuse theirs (First Block Cache)."""

    def __init__(self, test, indicator, first_unit=None):
        self.test, self.indicator, self.first_unit = test, indicator, first_unit
        self.reset()

    def reset(self):
        self.test.reset()
        self.inputs, self.first = {}, {}

    def step(self, cache, chunk, x, sigma, p):
        if self.indicator != "input" or chunk not in self.inputs:
            return False
        change = rel_l1(x, self.inputs[chunk])
        self.inputs[chunk] = x
        return self.test.reuse(chunk, change, p)

    def computed(self, cache, chunk, x):
        if self.indicator == "input":
            self.test.computed(chunk)
            self.inputs[chunk] = x

    def unit(self, cache, unit):
        return cache.current["skip_rest"]

    def block_done(self, cache, unit, residual):
        if self.indicator != "first_block" or unit != self.first_unit:
            return
        chunk = cache.current["chunk"]
        value = torch.cat([v.flatten() for v in residual.values()])
        previous = self.first.get(chunk)
        if previous is not None and previous.shape == value.shape \
                and self.test.reuse(chunk, rel_l1(value, previous), cache.current["progress"]):
            cache.current["skip_rest"] = True
            return
        self.test.computed(chunk)
        self.first[chunk] = value


# --- nodes --------------------------------------------------------------------------------------------------------

CATEGORY = "sampling/stride/accelerators"
PLAN_VERSION = 1


def check_window(start, end, label):
    if start > end:
        raise ValueError(f"Stride {label}: start ({start}) must not be after end ({end})")


def step_cache(model, threshold, start, end, max_hits, indicator):
    check_window(start, end, "step cache")
    units = [u for u in units_of(model) if u[2][0] == "dit"] if indicator == "first block residual" else []
    if indicator == "first block residual" and not any(family == "double" for _, family, _ in units):
        raise ValueError("Stride step cache: 'first block residual' needs a Flux-style DiT (its blocks are patched "
                         "through ComfyUI's 'dit' block replacements); use 'input change' for this model")
    test = ReuseTest(threshold, start, end, max_hits, accumulate=indicator == "input change")
    policy = AdaptivePolicy(test, "input" if indicator == "input change" else "first_block",
                            units[0][0] if units else None)
    return Cache("step cache", units, policy).patch(model, "stride_step_cache")


class StrideStepCache(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StrideStepCache", display_name="Adaptive step cache (Stride)", category=CATEGORY,
            description="Reuses the model's work while it changes little, for any sampler, with no calibration. "
                        "'input change' (any model): the last prediction is reused while the model input's "
                        "accumulated relative change stays below the threshold. 'first block residual' (Flux-style "
                        "DiTs): the first block runs, and while its residual is close to its last computed value the "
                        "other blocks add their stored residuals instead of running. Cond and uncond passes and "
                        "latent sizes are cached separately; the cache resets at every run, which logs its reuse "
                        "and measured speedup.",
            inputs=[io.Model.Input("model", tooltip="The model to cache."),
                    io.Float.Input("threshold", default=0.1, min=0.0, max=5.0, step=0.01,
                                   tooltip="Relative change below which stored work is reused (0: never). First "
                                           "block residual: about 0.1 for Flux-style models."),
                    io.Float.Input("start", default=0.2, min=0.0, max=1.0, step=0.05,
                                   tooltip="No reuse before this point of the noise range (0 = pure noise)."),
                    io.Float.Input("end", default=0.9, min=0.0, max=1.0, step=0.05,
                                   tooltip="No reuse after this point of the noise range (the last, detail steps)."),
                    io.Int.Input("max_hits", default=2, min=1, max=10,
                                 tooltip="Reuses in a row at most before the model runs again in full."),
                    io.Combo.Input("indicator", options=["input change", "first block residual"],
                                   default="input change", optional=True,
                                   tooltip="What measures the change: the model input (any model) or the first "
                                           "block's residual (Flux-style DiTs).")],
            outputs=[io.Model.Output(tooltip="The model with the step cache.")])

    @classmethod
    def execute(cls, model, threshold, start, end, max_hits, indicator="input change") -> io.NodeOutput:
        return io.NodeOutput(step_cache(model, threshold, start, end, max_hits, indicator))


def plan_text(fp, sampler_name, call_sigmas, plan, error):
    return json.dumps({"stride_cache_plan": PLAN_VERSION, "model": fp["id"], "sampler": sampler_name,
                       "call_sigmas": [round(s, 7) for s in call_sigmas], **plan.to_json(), "share": round(plan.share(), 4),
                       "error": round(error, 6)})


def parse_plan(text):
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"Stride cache plan: the plan text is not valid JSON ({e}); paste the text the calibrate "
                         "node wrote") from None
    if not isinstance(data, dict) or data.get("stride_cache_plan") != PLAN_VERSION:
        raise ValueError("Stride cache plan: not a Stride cache plan of this version; recalibrate")
    return data, Plan.from_json(data)


def apply_plan(model, text):
    """The model with the plan's cache: refused for another model or another block layout."""
    data, plan = parse_plan(text)
    fp = store.fingerprint(model)
    if data["model"] != fp["id"]:
        raise ValueError(f"Stride cache plan: made for model {data['model']}, this model is {fp['id']} (another "
                         "checkpoint, LoRA or patch); calibrate a plan for this model")
    units = units_of(model)
    if [u[0] for u in units] != plan.units:
        raise ValueError("Stride cache plan: the plan's blocks do not match this model's; calibrate a plan for it")
    return Cache("cache plan", units, PlanPolicy(plan, data["call_sigmas"])).patch(model, "stride_cache_plan")


def calibrate_plan(model, positive, negative, latent_image, sampler_name, scheduler, steps, cfg, samples, seed,
                   quantile, step_quantile, nonskip, sigmas=None):
    """InvarDiff's calibration on the user's sampler and schedule (ComfyUI's own sampling path): two measuring
    runs (the second with the first plan's stale references), then one run of the plan to measure its error
    against the full result on the calibration noises. Returns the plan text (stored, and reused when stored)."""
    latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
    latent = latent.repeat(-(-samples // latent.shape[0]), *[1] * (latent.ndim - 1))[:samples]
    fp = store.fingerprint(model)
    settings = {"sampler": sampler_name, "scheduler": scheduler, "steps": steps, "cfg": cfg, "samples": samples,
                "seed": seed, "latent": list(latent.shape[1:]), "quantile": quantile, "step_quantile": step_quantile,
                "nonskip": nonskip, "sigmas": None if sigmas is None else [round(float(s), 6) for s in sigmas],
                "conditioning": conditioning_digest(positive, negative)}
    found = store.find("cache_plan", settings, fp)
    if found is not None:
        logging.info("Stride cache plan: reused %s (no model run)", found[2])
        return found[1]["info"]["text"]
    units = units_of(model)
    names, families = [u[0] for u in units], [u[1] for u in units]
    noise = comfy.sample.prepare_noise(latent, seed)
    total = 3 * (len(sigmas) - 1 if sigmas is not None else steps)
    pbar = comfy.utils.ProgressBar(total)
    done = [0]

    def run(patched):
        def callback(*_):
            comfy.model_management.throw_exception_if_processing_interrupted()
            done[0] += 1
            pbar.update_absolute(min(done[0], total))
        return comfy.sample.sample(patched, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                                   sigmas=sigmas, callback=callback, disable_pbar=True, seed=seed)
    seen = {}

    def measure(plan):
        meter = RateMeter(plan)
        cache = Cache("cache plan calibration", units, meter=meter)
        out = run(cache.patch(model, "stride_cache_plan_calibration"))
        seen.setdefault("full", out)
        seen["call_sigmas"] = cache.call_sigmas
        calls = len(cache.call_sigmas)
        return meter.mean(calls, names), meter.mean(calls, ["step"])[:, 0]
    start = time.perf_counter()
    logging.info("Stride cache plan: calibrating %s with %s, 3 runs of %d steps on a batch of %d (%d blocks)",
                 model.model.__class__.__name__, sampler_name, total // 3, samples, len(units))
    plan = fit_plan(measure, names, families, quantile, step_quantile, nonskip)
    text = plan_text(fp, sampler_name, seen["call_sigmas"], plan, 0.0)
    cached = run(apply_plan(model, text))
    error = float((cached - seen["full"]).norm() / seen["full"].norm().clamp_min(1e-12))
    text = plan_text(fp, sampler_name, seen["call_sigmas"], plan, error)
    seconds = time.perf_counter() - start
    store.save("cache_plan", settings, fp, {"cache": plan.cache, "gate": plan.gate},
               {"text": text, "error": error, "seconds": round(seconds, 2)})
    logging.info("Stride cache plan: %.0f%% of block evaluations planned from the cache, %d gated calls of %d; "
                 "relative error against the full run %.4g on the calibration noises (%.1f s)", 100 * plan.share(),
                 int(plan.gate.sum()), len(plan.gate), error, seconds)
    return text


class StrideCalibrateCachePlan(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StrideCalibrateCachePlan", display_name="Calibrate cache plan (InvarDiff, Stride)",
            category=CATEGORY,
            description="InvarDiff (Wu 2025): measures on your model, sampler and schedule how fast each block's "
                        "output changes from call to call, and caches the blocks (and whole calls) that change "
                        "least, by quantile. Flux-style DiTs: double/single blocks; UNets: attention outputs; all "
                        "models: whole calls. The plan is stored and returned as text, so the workflow carries it.",
            inputs=[io.Model.Input("model", tooltip="The model to calibrate (with its LoRAs and patches)."),
                    io.Conditioning.Input("positive", tooltip="Conditioning of the calibration (prompts like yours)."),
                    io.Conditioning.Input("negative", tooltip="Negative conditioning of the calibration."),
                    io.Latent.Input("latent_image", tooltip="A latent of the size you will sample at."),
                    io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                                   tooltip="The sampler you will use (a plan holds for one sampler and schedule)."),
                    io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="simple",
                                   tooltip="The scheduler you will use (ignored when `sigmas` is connected)."),
                    io.Int.Input("steps", default=20, min=3, max=200, tooltip="The number of steps you will use."),
                    io.Float.Input("cfg", default=5.0, min=0.0, max=100.0, step=0.1, round=0.01,
                                   tooltip="The guidance scale you will use."),
                    io.Int.Input("samples", default=2, min=1, max=16, tooltip="Calibration noises (the batch)."),
                    io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=False,
                                 tooltip="Seed of the calibration noises."),
                    io.Float.Input("quantile", default=0.4, min=0.0, max=1.0, step=0.05,
                                   tooltip="About the share of block evaluations cached (InvarDiff's tau; 0: none)."),
                    io.Float.Input("step_quantile", default=0.3, min=0.0, max=1.0, step=0.05,
                                   tooltip="About the share of calls answered whole from the cache (0: none); the "
                                           "call after such a call always computes in full."),
                    io.Float.Input("nonskip", default=0.1, min=0.0, max=0.9, step=0.05,
                                   tooltip="Share of the first calls never cached (the layout forms there)."),
                    io.Sigmas.Input("sigmas", optional=True,
                                    tooltip="Optional: calibrate for this schedule (SamplerCustom) instead.")],
            outputs=[io.Model.Output(tooltip="The model with the plan applied."),
                     io.String.Output(display_name="plan", tooltip="The plan as text, for the cache plan node.")])

    @classmethod
    def execute(cls, model, positive, negative, latent_image, sampler_name, scheduler, steps, cfg, samples, seed,
                quantile, step_quantile, nonskip, sigmas=None) -> io.NodeOutput:
        text = calibrate_plan(model, positive, negative, latent_image, sampler_name, scheduler, steps, cfg, samples,
                              seed, quantile, step_quantile, nonskip, sigmas)
        return io.NodeOutput(apply_plan(model, text), text)


class StrideCachePlan(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StrideCachePlan", display_name="Cache plan (InvarDiff, Stride)", category=CATEGORY,
            description="Applies a cache plan made by the calibrate node (pasted or connected): the planned blocks "
                        "and calls reuse their last computed outputs. Refused for another model; calls the plan does "
                        "not know (another sampler or schedule) run in full, and the run's log says how many.",
            inputs=[io.Model.Input("model", tooltip="The model the plan was calibrated on."),
                    io.String.Input("plan", multiline=True, default="",
                                    tooltip="The plan text the calibrate node wrote.")],
            outputs=[io.Model.Output(tooltip="The model with the plan applied.")])

    @classmethod
    def execute(cls, model, plan) -> io.NodeOutput:
        return io.NodeOutput(apply_plan(model, plan))


NODES = [StrideStepCache, StrideCalibrateCachePlan, StrideCachePlan]
