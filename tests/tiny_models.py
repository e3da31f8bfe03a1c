"""Tiny untrained models of ComfyUI's real architectures, built from ComfyUI's own classes, no checkpoint.

For structural tests (patches, wrappers, shapes, batching, conditioning), not for image quality:
- `build_tiny_unet(seed)`: `comfy.supported_models.SD15` (EPS, SD1.5 discrete schedule), ~1 M parameters;
- `build_tiny_dit(seed)`: `comfy.supported_models.Flux` (rectified flow, Flux model sampling), ~0.4 M parameters.
Both work on 4-channel latents with an identity latent format (no SD1.5 0.18215 scale, no Flux latent
shift_factor); the DiT keeps Flux's own model sampling (ModelSamplingFlux, CONST, timestep = sigma).
ComfyUI's ops skip weight init, so the weights are filled here, seeded and non-trivial, so that
different samplers give clearly different results.

Each builder returns a `TinyModel(model, positive, negative, latent)`:
`model` is a ComfyUI ModelPatcher; `positive(batch=1, seed=1)` / `negative(batch=1, seed=2)` make
matching CONDITIONING (a different seed is a different "prompt"); `latent(batch=1, size=8)` is an empty
latent [batch, 4, size, size]. The pytest fixtures `tiny_unet` / `tiny_dit` are
session-scoped factories, `tiny_unet(seed=0)`, that build a fresh model on every call (30 ms / 6 ms),
so a test never sees another test's patches; the same seed gives the same weights.
"""
import functools
from typing import Callable, NamedTuple

import pytest
import torch

import comfy.latent_formats
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models
from bench import host
from bench.families import init_weights

UNET_CONTEXT_DIM = 64
DIT_CONTEXT_DIM = 32
DIT_POOLED_DIM = 16
TOKENS = 8


class TinyModel(NamedTuple):
    model: comfy.model_patcher.ModelPatcher
    positive: Callable[..., list]
    negative: Callable[..., list]
    latent: Callable[..., torch.Tensor]


def _randn(gen_seed, *shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(gen_seed))


def _patcher(model_config, seed):
    model_config.set_inference_dtype(torch.float32, None)
    model_config.latent_format = comfy.latent_formats.LatentFormat()  # 4 channels, scale 1, no shift
    model = model_config.get_model({}, "", device=torch.device("cpu"))
    init_weights(model.diffusion_model, seed)
    mm = comfy.model_management
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def empty_latent(batch=1, size=8):
    """An empty 4-channel latent [batch, 4, size, size] (size even: one UNet downsample, DiT patch 2)."""
    return torch.zeros(batch, 4, size, size)


def build_tiny_unet(seed=0):
    """SD1.5-architecture UNet (EPS), context_dim 64; SD15 forces 8 attention heads."""
    unet_config = {
        "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32,
        "num_res_blocks": [1, 1], "channel_mult": [1, 2],
        "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1], "transformer_depth_middle": 1,
        "context_dim": UNET_CONTEXT_DIM, "use_linear_in_transformer": False, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "use_temporal_attention": False,
        "use_temporal_resblock": False, "use_checkpoint": False,
    }
    patcher = _patcher(comfy.supported_models.SD15(unet_config), seed)

    def conditioning(batch=1, seed=1):
        return [[_randn(seed, batch, TOKENS, UNET_CONTEXT_DIM), {}]]

    return TinyModel(patcher, conditioning, functools.partial(conditioning, seed=2), empty_latent)


def build_tiny_dit(seed=0):
    """Flux-architecture DiT (rectified flow): hidden 64, 2 heads, 2 double + 2 single blocks, patch 2."""
    unet_config = {
        "image_model": "flux", "guidance_embed": True, "in_channels": 4, "out_channels": 4,
        "vec_in_dim": DIT_POOLED_DIM, "context_in_dim": DIT_CONTEXT_DIM, "hidden_size": 64, "mlp_ratio": 2.0,
        "num_heads": 2, "depth": 2, "depth_single_blocks": 2, "axes_dim": [8, 12, 12], "theta": 10000,
        "patch_size": 2, "qkv_bias": True,
    }
    flux_unet_config = host.stride("nodes.compat").flux_unet_config
    patcher = _patcher(comfy.supported_models.Flux(flux_unet_config(unet_config)), seed)

    def conditioning(batch=1, seed=1, guidance=3.5):
        # Flux needs pooled_output (its encode_adm reads it); guidance feeds the guidance embedding.
        extras = {"pooled_output": _randn(seed + 1000, batch, DIT_POOLED_DIM), "guidance": guidance}
        return [[_randn(seed, batch, TOKENS, DIT_CONTEXT_DIM), extras]]

    return TinyModel(patcher, conditioning, functools.partial(conditioning, seed=2), empty_latent)


@pytest.fixture(scope="session")
def tiny_unet():
    """tiny_unet(seed=0) -> a fresh TinyModel around a tiny SD1.5 UNet."""
    return build_tiny_unet


@pytest.fixture(scope="session")
def tiny_dit():
    """tiny_dit(seed=0) -> a fresh TinyModel around a tiny Flux DiT."""
    return build_tiny_dit
