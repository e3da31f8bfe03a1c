"""Bridge: the cache runtime in ComfyUI. It answers model calls (APPLY_MODEL wrapper) and blocks (Flux-style DiT
blocks through patches_replace "dit" and their attention through ComfyUI's attention override, UNet attention
through "attn1"/"attn2" replacements) from what earlier calls computed, driven by a policy from samplers/cache.py:
a calibrated InvarDiff plan or an adaptive reuse test. State is kept per chunk (cond/uncond set, conditionings and
shape), kept per run (OUTER_SAMPLE makes it, so concurrent runs and ComfyUI's multi-GPU worker threads never share
it), and each run logs its reuse and time."""
import copy
import logging
import threading
import time

import torch

import comfy.ldm.modules.attention
import comfy.patcher_extension

from ..samplers.cache import rel_l1
from .guidance import progress
from .runstate import PerRun, Run

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
        stacks = (("input", net.input_blocks), ("middle", [net.middle_block]), ("output", net.output_blocks))
        for name, blocks in stacks:
            for number, block in enumerate(blocks):
                for module in block.modules():
                    for j in range(len(getattr(module, "transformer_blocks", []))
                                   if type(module).__name__ == "SpatialTransformer" else 0):
                        for attn in ("attn1", "attn2"):
                            units.append((f"{attn}.{name}.{number}.{j}", attn, (attn, (name, number, j))))
    return units


def flat(value):
    """A unit's output as one tensor (a block's residuals: its streams flattened and joined)."""
    return torch.cat([v.flatten() for v in value.values()]) if isinstance(value, dict) else value


def chunk_of(transformer_options, x):
    """What a cache entry belongs to: the cond/uncond set, the conditionings (ComfyUI's uuids), the shape and the
    device (ComfyUI's multi-GPU work units send chunks to several devices)."""
    return (tuple(transformer_options.get("cond_or_uncond", [])), tuple(map(str, transformer_options.get("uuids", []))),
            tuple(x.shape), str(x.device))


class Cache:
    """The runtime: policy.step(call, chunk, x, sigma, progress) -> reuse the whole call (the last ODE slope of the
    chunk, D = x - sigma d); policy.unit(call, unit) -> reuse a unit's stored output (a block's residual, an attention
    output). A recorder (`meter`, samplers.cache.RateMeter) sees every unit's and call's output instead, and nothing
    is reused. Each run has its own state (nodes/runstate.py) and policy copy; a call's own state lives in its
    thread (its blocks run there). Reused tensors follow the device and dtype of the call that uses them (ComfyUI
    may move weights between calls)."""

    def __init__(self, name, units, policy=None, meter=None):
        self.name, self.units, self.policy, self.meter = name, units, policy, meter
        self.runs = PerRun(f"stride {name}", self.new_run, self.log)
        self.local = threading.local()
        self.last_run = None

    def new_run(self, options):
        policy = copy.deepcopy(self.policy)
        if policy is not None:
            policy.reset()
        return Run(slopes={}, stored={}, index={}, call_sigmas=[], calls=0, call_hits=0, unit_calls=0, unit_hits=0,
                   seconds=0.0, full_seconds=0.0, full_calls=0, policy=policy, start=time.perf_counter())

    def patch(self, model, key):
        patched = model.clone()
        patched.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, key, self.runs.outer)
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

    def log(self, run):
        self.last_run = run
        if not run.calls or self.meter is not None:
            return
        wall = time.perf_counter() - run.start
        blocks = (f", {run.unit_hits} of {run.unit_calls} block evaluations reused" if run.unit_calls else "")
        blocks += getattr(run.policy, "report", lambda: "")()
        estimate = ""
        if run.full_calls and run.seconds:  # labelled: an estimate from the calls that ran in full
            uncached = run.full_seconds / run.full_calls * run.calls
            estimate = (f"; estimated speedup in the model x{uncached / run.seconds:.2f} (against {run.calls} calls "
                        f"at the mean time of the {run.full_calls} that ran in full)")
        logging.info("Stride %s: %d of %d model calls answered from the cache%s; run %.2f s wall time, %.2f s in the "
                     "model%s", self.name, run.call_hits, run.calls, blocks, wall, run.seconds, estimate)

    def apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                    **kwargs):
        run = self.runs.find(transformer_options, self.name)
        if run is None:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        chunk = chunk_of(transformer_options, x)
        sigma = float(t.max())
        p = progress(executor.class_obj.model_sampling, sigma)
        # what the network sees (ComfyUI's input scaling: x / sqrt(sigma^2 + 1) for EPS models, x for flow)
        model_input = executor.class_obj.model_sampling.calculate_input(t, x)
        sigma_b = t.reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype)
        with run.lock:
            index = run.index.get(chunk, 0)
            run.index[chunk] = index + 1
            if chunk == next(iter(run.index)):  # the sigmas of the run's calls, as the first chunk saw them
                run.call_sigmas.append(sigma)
            call = {"run": run, "chunk": chunk, "index": index, "progress": p, "reused": 0, "skip_rest": False,
                    "sample_sigmas": transformer_options.get("sample_sigmas")}
            run.calls += 1
            hit = (run.policy is not None and run.policy.step(call, chunk, model_input, sigma, p)
                   and chunk in run.slopes)
            run.call_hits += hit
        if hit:
            return x - sigma_b * run.slopes[chunk].to(x)
        outer_call, self.local.call = getattr(self.local, "call", None), call
        try:
            start = time.perf_counter()
            out = executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
            elapsed = time.perf_counter() - start
        finally:
            self.local.call = outer_call
        slope = (x - out) / sigma_b
        with run.lock:
            run.seconds += elapsed
            if call["reused"] == 0:
                run.full_seconds, run.full_calls = run.full_seconds + elapsed, run.full_calls + 1
            if self.meter is not None:
                self.meter.update(chunk, index, "step", slope)
            run.slopes[chunk] = slope
            if run.policy is not None:
                run.policy.computed(call, chunk, model_input)
        return out

    def _call(self):
        """The current call of this thread (None outside a cached call)."""
        return getattr(self.local, "call", None)

    def _reuse(self, call, unit, stored, fits):
        """Whether this unit answers from its store in the current call (counted)."""
        run = call["run"]
        with run.lock:
            run.unit_calls += 1
            if stored is None or not fits or run.policy is None or not run.policy.unit(call, unit):
                return False
            run.unit_hits += 1
            call["reused"] += 1
            return True

    def _record(self, call, unit, value):
        run = call["run"]
        with run.lock:
            run.stored[(call["chunk"], unit)] = value
            if self.meter is not None:
                self.meter.update(call["chunk"], call["index"], unit, flat(value))

    def block(self, unit):
        """A "dit" block replacement: reuse the block's residuals (out - in of every stream) or run the block."""
        def replace(args, extra):
            call = self._call()
            if call is None:
                return extra["original_block"](args)
            stored = call["run"].stored.get((call["chunk"], unit))
            fits = stored is not None and all(k in args and args[k].shape == v.shape for k, v in stored.items())
            if self._reuse(call, unit, stored, fits):
                return {**{k: args[k] for k in ("img", "txt") if k in args},
                        **{k: args[k] + v.to(args[k]) for k, v in stored.items()}}
            # ComfyUI's blocks add to their inputs in place: keep the inputs to take the residuals
            inputs = {k: v.clone() for k, v in args.items() if k in ("img", "txt") and torch.is_tensor(v)}
            out = extra["original_block"](args)
            residual = {k: v - inputs[k] for k, v in out.items() if k in inputs and inputs[k].shape == v.shape}
            self._record(call, unit, residual)
            if call["run"].policy is not None:
                with call["run"].lock:
                    call["run"].policy.block_done(call, unit, residual)
            return out
        return replace

    def attention_override(self, units):
        """ComfyUI's attention override: reuse the attention output of a planned DiT block, or compute it."""
        def override(func, *args, **kwargs):
            options = kwargs.get("transformer_options") or {}
            unit = units.get((options.get("block_type"), options.get("block_index")))
            call = self._call()
            if unit is None or call is None:
                return func(*args, **kwargs)
            stored = call["run"].stored.get((call["chunk"], unit))
            if self._reuse(call, unit, stored, stored is not None):  # the chunk fixes the shapes
                return stored.to(args[0])
            out = func(*args, **kwargs)
            self._record(call, unit, out)
            return out
        return override

    def attention(self, unit):
        """An "attn1"/"attn2" replacement: reuse the attention output or compute it as ComfyUI does."""
        def replace(q, k, v, extra_options):
            call = self._call()
            stored = None if call is None else call["run"].stored.get((call["chunk"], unit))
            if call is not None and self._reuse(call, unit, stored, stored is not None and stored.shape == q.shape):
                return stored.to(q)
            out = comfy.ldm.modules.attention.optimized_attention(q, k, v, extra_options["n_heads"],
                                                                  attn_precision=extra_options.get("attn_precision"))
            if call is not None:
                self._record(call, unit, out)
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

    @staticmethod
    def same(a, b):
        return abs(a - b) <= 1e-4 * max(abs(b), 1e-3)

    def match(self, chunk, sigma, sample_sigmas):
        if self.fits is None:  # the run's schedule: every step's sigma must be one the plan was made on
            self.fits = sample_sigmas is None or all(any(self.same(c, float(s)) for c in self.call_sigmas)
                                                     for s in sample_sigmas if float(s) > 0)
        for j in range(self.pointer.get(chunk, 0), len(self.call_sigmas) if self.fits else 0):
            if self.same(self.call_sigmas[j], sigma):
                self.pointer[chunk] = j + 1
                return j
        self.unmatched += 1
        return None

    def report(self):
        return (f"; {self.unmatched} calls not in the plan ran in full (the plan was made for another sampler or "
                "schedule)" if self.unmatched else "")

    def step(self, call, chunk, x, sigma, p):
        t = self.match(chunk, sigma, call["sample_sigmas"])
        call["plan_index"] = t
        return t is not None and bool(self.plan.gate[t])

    def unit(self, call, unit):
        t = call.get("plan_index")
        return t is not None and self.plan.cached(t, unit)

    def computed(self, call, chunk, x):
        pass

    def block_done(self, call, unit, residual):
        pass


class AdaptivePolicy:
    """No calibration (samplers.cache.ReuseTest): indicator "input" = the relative change of the network's input
    (after ComfyUI's input scaling), accumulated since the last computed call, decides whole calls; "first_block" =
    the first block's residual against its last computed value decides whether the other blocks reuse theirs (First
    Block Cache)."""

    def __init__(self, test, indicator, first_unit=None):
        self.test, self.indicator, self.first_unit = test, indicator, first_unit
        self.reset()

    def reset(self):
        self.test.reset()
        self.inputs, self.first = {}, {}

    def step(self, call, chunk, x, sigma, p):
        if self.indicator != "input" or chunk not in self.inputs:
            return False
        change = rel_l1(x, self.inputs[chunk].to(x))
        self.inputs[chunk] = x
        return self.test.reuse(chunk, change, p)

    def computed(self, call, chunk, x):
        if self.indicator == "input":
            self.test.computed(chunk)
            self.inputs[chunk] = x

    def unit(self, call, unit):
        return call["skip_rest"]

    def block_done(self, call, unit, residual):
        if self.indicator != "first_block" or unit != self.first_unit:
            return
        chunk = call["chunk"]
        value = flat(residual)
        previous = self.first.get(chunk)
        if previous is not None and previous.shape == value.shape \
                and self.test.reuse(chunk, rel_l1(value, previous.to(value)), call["progress"]):
            call["skip_rest"] = True
            return
        self.test.computed(chunk)
        self.first[chunk] = value
