"""Bridge: where the ComfyUI versions Stride supports (0.3.75 to 0.33+) differ, bridged by feature detection.

Each difference is bridged here once, by looking at what the running ComfyUI has (never by its version string).
"""
import dataclasses
import inspect
from contextlib import contextmanager

import comfy.ldm.flux.model
import comfy.model_management
from comfy_api.latest import io

# Stride ships Flux-family weights with the QK-norm parameters named as ComfyUI 0.3.75 names them (`.scale`);
# newer trees name them `.weight` and convert old checkpoints in `process_unet_state_dict`.
_SHIPPED_NORMS = (".query_norm.", ".key_norm.")


def flux_unet_config(unet_config):
    """A Flux unet_config for this ComfyUI: newer FluxParams require `txt_ids_dims` ([] = the all-zero text
    positions that older trees always used); older ones refuse the field."""
    fields = {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}
    if "txt_ids_dims" in fields and "txt_ids_dims" not in unet_config:
        return {**unet_config, "txt_ids_dims": []}
    return dict(unet_config)


def load_diffusion_weights(model_config, diffusion_model, state_dict):
    """Load shipped weights into `diffusion_model` through the config's own key conversion (a no-op where the
    running ComfyUI uses the shipped names). Returns (missing, unexpected) like load_state_dict(strict=False)."""
    converted = model_config.process_unet_state_dict(dict(state_dict))
    return diffusion_model.load_state_dict(converted, strict=False)


def shipped_state(state_dict):
    """A diffusion model's state dict with keys as Stride ships them (loadable on every supported ComfyUI)."""
    def shipped(key):
        if any(n in key for n in _SHIPPED_NORMS) and key.endswith(".weight"):
            return key[:-len(".weight")] + ".scale"
        return key
    return {shipped(k): v for k, v in state_dict.items()}


def _takes_advanced():
    return "advanced" in inspect.signature(io.Input.__init__).parameters


# Keyword arguments for an expert input: folded into the node's advanced section where V3 inputs take `advanced=`
# (newer trees); nothing on trees without it, where every input shows as before.
EXPERT = {"advanced": True} if _takes_advanced() else {}


# Fields newer ComfyUI trees added to a model family's parameter dataclass, each with the value that keeps the older
# behaviour (what older trees hard-wired): used only where the running tree's dataclass has the field.
NEUTRAL_FIELDS = {"txt_ids_dims": [], "vec_in_dim": None, "meanflow_sum": False}


def params_config(params_class, unet_config):
    """A unet_config for a family whose model takes a parameter dataclass (FluxParams, ChromaParams,
    HunyuanVideoParams...): fields the running tree requires and the config lacks get their neutral value
    (NEUTRAL_FIELDS); fields the running tree does not know are dropped (an older tree than the config)."""
    fields = {f.name: f for f in dataclasses.fields(params_class)}
    config = dict(unet_config)
    for name, field in fields.items():
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        if required and name not in config and name in NEUTRAL_FIELDS:
            config[name] = NEUTRAL_FIELDS[name]
    return config


@contextmanager
def training():
    """ComfyUI's training flag while gradients flow through the model: newer trees route Flux's rotary embedding
    through a comfy_kitchen kernel that has no backward unless `comfy.model_management.in_training` is set (as
    ComfyUI's own LoRA trainer sets it). Older trees have no such flag: nothing to do there."""
    if not hasattr(comfy.model_management, "in_training"):
        yield
        return
    before = comfy.model_management.in_training
    comfy.model_management.in_training = True
    try:
        yield
    finally:
        comfy.model_management.in_training = before
