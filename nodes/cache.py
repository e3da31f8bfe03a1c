"""Bridge: the cache runtime in ComfyUI. It answers model calls (APPLY_MODEL wrapper) and blocks from what earlier
calls computed: a DiT's blocks through patches_replace "dit", with the keys the model itself looks up in each call
(any family ComfyUI gives block replacement: Flux, Chroma, SD3, AuraFlow, HunyuanDiT, Wan, Qwen-Image, HunyuanVideo,
LTX, Mochi, Kandinsky5...), their attention through ComfyUI's attention override where the model names its blocks,
UNet attention through "attn1"/"attn2" replacements. A model that looks up no block is cached by whole calls, and
the log says so. The policy comes from samplers/cache.py: a calibrated InvarDiff plan or an adaptive reuse test.
State is kept per chunk (cond/uncond set, conditionings and shape), kept per run (OUTER_SAMPLE makes it, so
concurrent runs and ComfyUI's multi-GPU worker threads never share it), and each run logs its reuse and time."""
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


def is_unet(model):
    """A UNet (SD1.x/SD2/SDXL-style): its units are ComfyUI's "attn1"/"attn2" replacements, found statically."""
    net = model.model.diffusion_model
    return hasattr(net, "input_blocks") and hasattr(net, "output_blocks")


def unet_units(model):
    """[(unit name, family, (patch kind, key))] of a UNet's self- and cross-attention ("attn1"/"attn2")."""
    net = model.model.diffusion_model
    units = []
    stacks = (("input", net.input_blocks), ("middle", [net.middle_block]), ("output", net.output_blocks))
    for name, blocks in stacks:
        for number, block in enumerate(blocks):
            for module in block.modules():
                for j in range(len(getattr(module, "transformer_blocks", []))
                               if type(module).__name__ == "SpatialTransformer" else 0):
                    for attn in ("attn1", "attn2"):
                        units.append((f"{attn}.{name}.{number}.{j}", attn, (attn, (name, number, j))))
    return units


def dit_unit(key):
    """The unit of a "dit" replacement key the model looked up: ("double_block", 3) -> "double_block.3", family
    "double" (Flux's names, kept stable: plan texts store them); None for a key of another form."""
    if not (isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], str) and isinstance(key[1], int)):
        return None
    kind = key[0][:-len("_block")] if key[0].endswith("_block") else key[0]
    return (f"{key[0]}.{key[1]}", kind, ("dit", key))


def attention_unit(block_type, block_index):
    """The unit of the attention inside a DiT block, as ComfyUI tells it in transformer_options."""
    return (f"attn.{block_type}_block.{block_index}", "attn", ("attention", (block_type, block_index)))


def units_of(model, probe=None):
    """[(unit name, family, (patch kind, key))] of what ComfyUI lets Stride replace in `model`: a UNet's attention
    ("attn1"/"attn2", found statically); a DiT's blocks as the model itself looks them up in
    patches_replace["dit"] and the attention inside them (ComfyUI's optimized_attention_override, told apart by
    the block type and index the model sets), recorded during `probe(patched)` (one model call on the user's
    inputs). [] where the model looks up none (whole calls only) or no probe is given."""
    if is_unet(model):
        return unet_units(model)
    if probe is None:
        return []
    recorder = Cache("block discovery", [], discover=True, attention=True, quiet=True)
    probe(recorder.patch(model, "stride_block_discovery"))
    run = recorder.last_run
    if recorder.broken:
        logging.warning("Stride block discovery: %s", recorder.broken)
    return [] if run is None else list(run.seen.values()) + list(run.seen_attention.values())


def units_named(model, names):
    """A plan's units (by the names it stores) on `model`; None where a name is no unit Stride knows here."""
    if is_unet(model):
        units = {u[0]: u for u in unet_units(model)}
        return [units[n] for n in names] if all(n in units for n in names) else None
    out = []
    for name in names:
        head, _, index = name.rpartition(".")
        if not index.isdigit() or not head:
            return None
        if head.startswith("attn.") and head.endswith("_block"):
            out.append(attention_unit(head[len("attn."):-len("_block")], int(index)))
        elif not head.startswith("attn"):
            out.append(dit_unit((head, int(index))))
        else:
            return None
    return out


def family_name(base):
    """How logs and refusals name a model's family: its ComfyUI supported_models class (SD15, Flux, WAN21_T2V...),
    else its model class."""
    return type(getattr(base, "model_config", None) or base).__name__


def no_blocks_reason(base):
    """Why a model (ComfyUI's BaseModel) has no block units: said in the log and in refusals."""
    return (f"{family_name(base)} looks up no ComfyUI 'dit' block replacement (patches_replace[\"dit\"]), "
            "so its blocks cannot be cached")


def residuals(inputs, out):
    """A block's residual per stream (out - in; None where the block returns None), or None where a stream it
    returns is not one of its inputs of the same shape (then it cannot be replayed)."""
    residual = {}
    for key, value in out.items():
        if value is None:
            residual[key] = None
        elif torch.is_tensor(value) and key in inputs and inputs[key].shape == value.shape:
            residual[key] = value - inputs[key]
        else:
            return None
    return residual


class BlockKeys(dict):
    """patches_replace["dit"] for one model call: every block key the model looks up (its own keys, whatever the
    family: Flux's double/single blocks, an MMDiT's or Wan's blocks...) is answered with Stride's replacement of
    that block, and recorded. Replacements another node set are kept (looked up first) and left to it."""

    def __init__(self, others, cache, allowed, seen):
        super().__init__(others)
        self.cache, self.allowed, self.seen = cache, allowed, seen

    def _ours(self, key):
        if dict.__contains__(self, key):
            return None
        unit = dit_unit(key)
        if unit is None or (self.allowed is not None and unit[0] not in self.allowed):
            return None
        self.seen.setdefault(unit[0], unit)
        return unit

    def __contains__(self, key):
        return dict.__contains__(self, key) or self._ours(key) is not None

    def __getitem__(self, key):
        if dict.__contains__(self, key):
            return dict.__getitem__(self, key)
        unit = self._ours(key)
        if unit is None:
            raise KeyError(key)
        return self.cache.block(unit[0])

    def get(self, key, default=None):
        return self[key] if key in self else default


def flat(value):
    """A unit's output as one tensor (a block's residuals: its streams flattened and joined)."""
    if isinstance(value, dict):
        return torch.cat([v.flatten() for v in value.values() if v is not None])
    return value


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

    def __init__(self, name, units, policy=None, meter=None, discover=False, attention=False, quiet=False):
        """units: the units to cache (a plan's); discover: every "dit" block the model looks up is a unit (the
        step cache's first-block indicator, block discovery); attention: record the attention of DiT blocks too."""
        self.name, self.units, self.policy, self.meter = name, units, policy, meter
        dit = {unit for unit, _, (kind, _) in units if kind == "dit"}
        self.dit = None if discover else dit  # the "dit" units answered (None: all the model looks up)
        self.inject = discover or bool(dit)
        self.record_attention, self.quiet = attention, quiet
        self.broken = None  # why the model's own block wrapper cannot run here (then whole calls only)
        self.runs = PerRun(f"stride {name}", self.new_run, self.log)
        self.local = threading.local()
        self.last_run = None

    def new_run(self, options):
        policy = copy.deepcopy(self.policy)
        if policy is not None:
            policy.reset()
        return Run(slopes={}, stored={}, index={}, call_sigmas=[], calls=0, call_hits=0, unit_calls=0, unit_hits=0,
                   seconds=0.0, full_seconds=0.0, full_calls=0, policy=policy, start=time.perf_counter(), seen={},
                   seen_attention={}, fallback="", model=None)

    def patch(self, model, key):
        patched = model.clone()
        patched.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, key, self.runs.outer)
        patched.add_wrapper_with_key(WrappersMP.APPLY_MODEL, key, self.apply_model)
        options = patched.model_options.setdefault("transformer_options", {})
        attention = {where: unit for unit, _, (kind, where) in self.units if kind == "attention"}
        if (attention or self.record_attention) and "optimized_attention_override" in options:
            logging.warning("Stride %s: another node overrides the attention; the attention outputs are not cached",
                            self.name)
        elif attention or self.record_attention:
            options["optimized_attention_override"] = self.attention_override(attention)
        replaced = options.get("patches_replace", {})
        for unit, _, (kind, where) in self.units:
            if kind in ("attention", "dit"):  # attention: the override; dit: each call's BlockKeys
                continue
            if where in replaced.get(kind, {}):
                logging.warning("Stride %s: %s already has a replacement from another node; left to it", self.name,
                                unit)
                continue
            patched.set_model_patch_replace(self.block(unit) if kind == "dit" else self.attention(unit), kind, *where)
        return patched

    def log(self, run):
        self.last_run = run
        if not run.calls or self.meter is not None or self.quiet:
            return
        wall = time.perf_counter() - run.start
        blocks = (f", {run.unit_hits} of {run.unit_calls} block evaluations reused" if run.unit_calls else "")
        blocks += getattr(run.policy, "report", lambda: "")()
        if run.fallback:
            blocks += f"; {run.fallback}"
        if self.inject and run.calls and not run.seen and not run.fallback:
            blocks += (f"; no block was cached: {self.broken or no_blocks_reason(run.model)}"
                       if run.model is not None else "")
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
        plain_options = transformer_options
        if self.inject and self.broken is None:  # this call's "dit" lookups answered by Stride's replacements
            patches = dict(transformer_options.get("patches_replace", {}))
            patches["dit"] = BlockKeys(patches.get("dit", {}), self, self.dit, run.seen)
            transformer_options = {**transformer_options, "patches_replace": patches}
        outer_call, self.local.call = getattr(self.local, "call", None), call
        try:
            start = time.perf_counter()
            try:
                out = executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
            except Exception as error:  # noqa: BLE001 (only the model's own block wrapper failing is handled)
                if not call.get("wrapper_failed"):
                    raise
                self.broken = (f"{family_name(executor.class_obj)}'s own 'dit' block wrapper fails in this ComfyUI "
                               f"({type(error).__name__}: {str(error)[:120]}), so its blocks cannot be cached")
                logging.warning("Stride %s: %s; the call runs without block replacement", self.name, self.broken)
                with run.lock:
                    run.seen.clear()
                    run.stored = {k: v for k, v in run.stored.items() if k[0] != chunk}
                call["wrapper_failed"] = False
                out = executor(x, t, c_concat, c_crossattn, control, plain_options, **kwargs)
            elapsed = time.perf_counter() - start
        finally:
            self.local.call = outer_call
        if self.inject and not run.seen and run.model is None:  # the model cached no block: say so, once a run
            run.model = executor.class_obj
            fall_back = getattr(run.policy, "fall_back", None)
            if fall_back is not None:
                run.fallback = fall_back(self.broken or no_blocks_reason(executor.class_obj))
                logging.warning("Stride %s: %s", self.name, run.fallback)
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
            fits = stored is not None and all(v is None or (torch.is_tensor(args.get(k)) and args[k].shape == v.shape)
                                              for k, v in stored.items())
            if self._reuse(call, unit, stored, fits):
                return {k: None if v is None else args[k] + v.to(args[k]) for k, v in stored.items()}
            # ComfyUI's blocks add to their inputs in place: keep the inputs to take the residuals
            inputs = {k: v.clone() for k, v in args.items() if torch.is_tensor(v) and k not in ("pe", "vec")}
            try:
                out = extra["original_block"](args)
            except (TypeError, KeyError, AttributeError):  # the model's own wrapper calling its block wrongly
                call["wrapper_failed"] = True  # (apply_model reruns the call without replacements)
                raise
            residual = residuals(inputs, out)
            if residual is None:  # a stream that is not its input plus a residual: this block always computes
                return out
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
            where = (options.get("block_type"), options.get("block_index"))
            unit = units.get(where)
            call = self._call()
            if unit is None and self.record_attention and where[0] is not None and call is not None:
                call["run"].seen_attention.setdefault(attention_unit(*where)[0], attention_unit(*where))
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

    def fall_back(self, reason):
        """A model with no block replacement: the input-change indicator decides whole calls instead."""
        if self.indicator != "first_block":
            return ""
        self.indicator, self.test.accumulate = "input", True
        return f"{reason}; whole calls are cached instead, the input change deciding (no first block residual)"

    def block_done(self, call, unit, residual):
        if self.indicator == "first_block" and self.first_unit is None:
            self.first_unit = unit  # the first block the model looked up
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
