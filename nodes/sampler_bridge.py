"""The bridge between Stride's pure samplers and ComfyUI: the model's parameterization, seeded noise, checks,
the `stride_*` names of the KSampler lists."""
import functools
import inspect

import torch

from ..samplers import flow, momentum, multistep
from ..samplers.core import VE, Param, check_sigmas

DUALFAST_STRENGTH = 0.5
TIME_SHIFT = {"window": 0.3, "cutoff": 0.7}

# The `stride_*` names added to KSampler / KSamplerSelect: (function, default options). Never rename one:
# saved workflows refer to these strings.
KSAMPLERS = {
    "stride_dpmpp_2m": (multistep.sample_dpmpp, {"order": 2}),
    "stride_dpmpp_3m": (multistep.sample_dpmpp, {"order": 3}),
    "stride_unipc": (multistep.sample_unipc, {"order": 3, "variant": "bh1"}),
    "stride_unipc_bh2": (multistep.sample_unipc, {"order": 3, "variant": "bh2"}),
    "stride_ddim_dualfast": (multistep.sample_ddim, {"dualfast": DUALFAST_STRENGTH}),
    "stride_dpmpp_2m_dualfast": (multistep.sample_dpmpp, {"order": 2, "dualfast": DUALFAST_STRENGTH}),
    "stride_unipc_dualfast": (multistep.sample_unipc, {"order": 3, "variant": "bh2", "dualfast": DUALFAST_STRENGTH}),
    "stride_dpmpp_2m_hb": (multistep.sample_dpmpp, {"order": 2, "beta": 0.8}),
    "stride_plms_hb": (momentum.sample_plms_hb, {"order": 4, "beta": 0.8}),
    "stride_ghvb": (momentum.sample_ghvb, {"order": 2.5}),
    "stride_dpmpp_2m_ts": (multistep.sample_dpmpp, {"order": 2, "time_shift": TIME_SHIFT}),
    "stride_flowturbo": (flow.sample_flowturbo, {"heun_steps": 2}),
    "stride_mixed_sde": (flow.sample_mixed_sde, {"eta": 0.7, "window": (0.0, 0.3)}),
}


class SampleNotFinite(RuntimeError):
    """A Stride sampler produced NaN/inf (raised instead of returning a black image)."""


def model_param(model):
    """The Param of the model being sampled (model: the denoiser KSAMPLER hands a sampler)."""
    import comfy.model_sampling
    ms = model.inner_model.model_patcher.get_model_object("model_sampling")
    if isinstance(ms, comfy.model_sampling.CONST):
        return Param(True, float(ms.percent_to_sigma(1e-4)))  # ComfyUI's own first-sigma offset
    return VE


def bridged(fn, name):
    """fn with ComfyUI's pieces filled in: the model's Param (unless given), a noise sampler seeded from the
    run's seed, a checked schedule, and a clear error instead of a NaN image."""
    accepts = inspect.signature(fn).parameters

    @functools.wraps(fn)
    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        check_sigmas(sigmas, name)
        if len(sigmas) <= 1:
            return x
        if "param" in accepts and options.get("param") in (None, "model"):
            options["param"] = model_param(model)
        elif options.get("param") == "ve":
            options["param"] = VE
        if "noise_sampler" in accepts and options.get("noise_sampler") is None:
            from comfy.k_diffusion.sampling import default_noise_sampler
            options["noise_sampler"] = default_noise_sampler(x, seed=(extra_args or {}).get("seed"))
        out = fn(model, x, sigmas, extra_args, callback, disable, **options)
        if not bool(torch.isfinite(out).all()):
            raise SampleNotFinite(f"Stride {name}: the sample is not finite (NaN/inf); the schedule "
                                  f"{[round(float(s), 4) for s in sigmas]} or the options are too aggressive "
                                  "for this model")
        return out
    return sample


def sampler_object(fn, name, options):
    """A ComfyUI SAMPLER running fn with options."""
    import comfy.samplers
    return comfy.samplers.KSAMPLER(bridged(fn, name), dict(options))


def stride_sampler(name, **overrides):
    """The SAMPLER behind a `stride_*` name, with its defaults and any overrides."""
    fn, options = KSAMPLERS[name]
    return sampler_object(fn, name, {**options, **overrides})


def register_ksampler_names(extra=None):
    """Add the `stride_*` names (and `extra` ones, same form) to ComfyUI's KSampler lists (idempotent): KSampler
    resolves a name through comfy.k_diffusion.sampling.sample_<name>, and both name lists are read on every
    /object_info request."""
    import comfy.k_diffusion.sampling as kds
    import comfy.samplers
    for name, (fn, options) in {**KSAMPLERS, **(extra or {})}.items():
        setattr(kds, "sample_" + name, functools.partial(bridged(fn, name), **options))
        for names in (comfy.samplers.KSAMPLER_NAMES, comfy.samplers.SAMPLER_NAMES):
            if name not in names:
                names.append(name)
