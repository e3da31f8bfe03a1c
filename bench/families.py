"""Tiny random-weight models of every major model family ComfyUI ships, built through ComfyUI's own
`comfy.supported_models` classes (no checkpoint), for the coverage matrix (tests/test_coverage.py, bench/coverage.py).

Each family keeps what a sampler, a guidance patch or a cache meets in the real model: the config class (so the model
class, its extra conditioning and its model sampling: EPS, V, flow with the family's shift, Cosmos' flow), the real
latent format and channel count (4, 16, 12, 32, 48, 128 channels; 5-D [B, C, T, H, W] video latents), the conditioning
form (context width, pooled vectors, guidance embedding, attention masks, several encoders' outputs, I2V concat
latents) and the block layout, made small: a few blocks, width 32 to 128. ComfyUI's ops leave weights uninitialised;
they are filled seeded (randn / sqrt(fan_in) for matrices, 1 for norm weights, 0 for biases), so equal seeds are equal
models. A family this ComfyUI lacks, or one that cannot run on this machine, is listed with the reason
(`unavailable(name)`), never dropped.

`build(name, depth=2, seed=0)` -> Built(model, positive, negative, latent, family): `model` a ComfyUI ModelPatcher;
`positive(batch=1)` / `negative(batch=1)` CONDITIONING; `latent(batch=1)` an empty latent of the family's shape.
`depth` counts the blocks of each stack (T-Stitch pairs a depth-2 large with a depth-1 small model of one family).
"""
import functools
import importlib
import math
from typing import Callable, NamedTuple

import torch

TOKENS = 8
CTX = 32  # text-encoder width of every family (its own context projection maps it to the model width)
POOLED = 32


class Family(NamedTuple):
    name: str            # the matrix row
    config: str          # comfy.supported_models class
    unet: Callable       # depth -> unet_config
    latent: tuple        # latent shape without the batch
    extras: Callable = None  # (seed, batch, latent shape) -> conditioning extras
    context: int = CTX   # width of the cross-attention tensor (0: none)
    note: str = ""


def _randn(seed, *shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _pooled(seed, batch, shape, guidance=None):
    out = {"pooled_output": _randn(seed + 1000, batch, POOLED)}
    if guidance is not None:
        out["guidance"] = guidance
    return out


def _mask(seed, batch, shape):
    return {"attention_mask": torch.ones(batch, TOKENS, dtype=torch.long)}


def _flux(compat, depth, **over):
    config = {"image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16,
              "vec_in_dim": POOLED, "context_in_dim": CTX, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2,
              "depth": depth, "depth_single_blocks": depth, "axes_dim": [8, 12, 12], "theta": 10000,
              "patch_size": 2, "qkv_bias": True}
    return compat.flux_unet_config({**config, **over})


def _unet(depth, **over):
    config = {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32,
              "num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [1, 1],
              "transformer_depth_output": [1, 1, 1, 1], "transformer_depth_middle": 1, "context_dim": CTX,
              "use_linear_in_transformer": False, "use_spatial_transformer": True, "legacy": False,
              "adm_in_channels": None, "use_temporal_attention": False, "use_temporal_resblock": False,
              "use_checkpoint": False, "num_head_channels": 16}
    if depth == 1:  # the small sibling: one transformer level fewer
        config.update(transformer_depth=[0, 1], transformer_depth_output=[0, 0, 1, 1])
    return {**config, **over}


def _hydit(seed, batch, shape):
    return {"attention_mask": torch.ones(batch, TOKENS, dtype=torch.long),
            "conditioning_mt5xl": _randn(seed + 7, batch, TOKENS, CTX),
            "attention_mask_mt5xl": torch.ones(batch, TOKENS, dtype=torch.long),
            "width": 64, "height": 64}


def _hidream(seed, batch, shape):
    return {"pooled_output": _randn(seed + 1000, batch, POOLED),
            "conditioning_llama3": _randn(seed + 7, batch, 2, TOKENS, CTX)}


def _wan_i2v(seed, batch, shape):
    image = _randn(seed + 11, batch, *shape)[:, :16]
    return {"concat_latent_image": image}


def _ltxv(seed, batch, shape):
    return {"attention_mask": torch.ones(batch, TOKENS, dtype=torch.long), "frame_rate": 25}


def _flux2_ref(seed, batch, shape):
    return {"guidance": 3.5}


FAMILIES = [
    Family("SD1.5", "SD15", lambda c, d: _unet(d), (4, 8, 8), note="UNet, EPS"),
    Family("SDXL", "SDXL", lambda c, d: _unet(d, adm_in_channels=POOLED + 1536, num_classes="sequential",
                                              use_linear_in_transformer=True, model_channels=64), (4, 8, 8),
           lambda s, b, sh: {"pooled_output": _randn(s + 1000, b, POOLED), "width": 64, "height": 64},
           note="UNet (SDXL forces 64-wide heads), EPS, pooled + size embedding"),
    Family("SD3.5", "SD3", lambda c, d: {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2,
                                         "num_blocks": 2 * d, "adm_in_channels": POOLED, "pos_embed_max_size": 16,
                                         "context_embedder_config": {"target": "torch.nn.Linear", "params": {
                                             "in_features": CTX, "out_features": 128}},
                                         "pos_embed_scaling_factor": None, "qk_norm": "rms"},
           (16, 8, 8), lambda s, b, sh: _pooled(s, b, sh), note="MMDiT, flow shift 3"),
    Family("Flux dev", "Flux", lambda c, d: _flux(c, d), (16, 8, 8), lambda s, b, sh: _pooled(s, b, sh, 3.5),
           note="guidance embedding"),
    Family("Flux schnell", "FluxSchnell", lambda c, d: _flux(c, d, guidance_embed=False), (16, 8, 8),
           lambda s, b, sh: _pooled(s, b, sh), note="no guidance embedding"),
    Family("Flux Kontext", "Flux", lambda c, d: _flux(c, d), (16, 8, 8),
           lambda s, b, sh: {**_pooled(s, b, sh, 2.5), "reference_latents": [_randn(s + 21, 1, *sh)]},
           note="Flux dev with a reference latent (image editing)"),
    Family("Flux2", "Flux2", lambda c, d: _flux(c, d, image_model="flux2", in_channels=128, out_channels=128,
                                                 axes_dim=[8, 8, 8, 8], theta=2000, mlp_ratio=3.0,
                                                 global_modulation=True, vec_in_dim=None, mlp_silu_act=True,
                                                 qkv_bias=False, ops_bias=False, default_ref_method="index",
                                                 ref_index_scale=10.0, patch_size=1),
           (128, 4, 4), lambda s, b, sh: _pooled(s, b, sh, 3.5), note="128-channel latent, global modulation"),
    Family("Chroma", "Chroma", lambda c, d: {"image_model": "chroma", "in_channels": 64, "out_channels": 64,
                                             "context_in_dim": CTX, "hidden_size": 64, "mlp_ratio": 2.0,
                                             "num_heads": 2, "depth": d, "depth_single_blocks": d,
                                             "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2,
                                             "qkv_bias": True, "in_dim": 64, "out_dim": 64, "hidden_dim": 64,
                                             "n_layers": 1},
           (16, 8, 8), lambda s, b, sh: _pooled(s, b, sh),
           note="Flux-style, distilled modulation (the pooled vector is unused)"),
    Family("AuraFlow", "AuraFlow", lambda c, d: {"cond_seq_dim": CTX, "in_channels": 4, "out_channels": 4,
                                                 "patch_size": 2, "dim": 64, "n_layers": 2 * d,
                                                 "n_double_layers": d, "n_heads": 2, "global_conddim": 64,
                                                 "max_seq": 64},
           (4, 8, 8), note="MMDiT double + single layers"),
    Family("PixArt Sigma", "PixArtSigma", lambda c, d: {"image_model": "pixart_sigma", "input_size": 64,
                                                        "patch_size": 8, "in_channels": 4, "hidden_size": 64,
                                                        "depth": 2 * d, "num_heads": 2, "caption_channels": CTX,
                                                        "model_max_length": TOKENS, "micro_condition": False,
                                                        "pe_interpolation": 0.5},
           (4, 96, 96), note="EPS DiT (its positions need a latent of 48+ pixels, also at half scale: patch 8)"),
    Family("HunyuanDiT", "HunyuanDiT1", lambda c, d: {"image_model": "hydit1", "input_size": [8, 8],
                                                      "patch_size": 2, "in_channels": 4, "hidden_size": 64,
                                                      "depth": 2 * d, "num_heads": 2, "text_states_dim": CTX,
                                                      "text_states_dim_t5": CTX, "text_len": TOKENS,
                                                      "text_len_t5": TOKENS, "size_cond": False,
                                                      "use_style_cond": False, "learn_sigma": True},
           (4, 8, 8), _hydit, note="V-prediction, two text encoders + masks"),
    Family("Lumina2", "Lumina2", lambda c, d: {"image_model": "lumina2", "patch_size": 2, "in_channels": 16,
                                               "dim": 64, "cap_feat_dim": CTX, "n_layers": 2 * d,
                                               "n_refiner_layers": 1, "qk_norm": True, "n_heads": 2,
                                               "n_kv_heads": 1, "axes_dims": [8, 12, 12],
                                               "axes_lens": [300, 64, 64], "multiple_of": 16},
           (16, 8, 8), _mask, note="flow shift 6, attention mask"),
    Family("Z-Image", "ZImage", lambda c, d: {"image_model": "lumina2", "patch_size": 2, "in_channels": 16,
                                              "dim": 256, "cap_feat_dim": CTX, "n_layers": 2 * d,
                                              "n_refiner_layers": 1, "qk_norm": True, "n_heads": 2,
                                              "n_kv_heads": 2, "axes_dims": [32, 48, 48], "axes_lens": [300, 64, 64],
                                              "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0,
                                              "z_image_modulation": True, "time_scale": 1000.0,
                                              "multiple_of": 16},
           (16, 8, 8), _mask, note="Lumina2 architecture, flow shift 3"),
    Family("HiDream", "HiDream", lambda c, d: {"image_model": "hidream", "patch_size": 2, "in_channels": 16,
                                               "out_channels": 16, "num_layers": d, "num_single_layers": d,
                                               "attention_head_dim": 32, "num_attention_heads": 2,
                                               "caption_channels": [CTX, CTX], "text_emb_dim": POOLED,
                                               "num_routed_experts": 2, "num_activated_experts": 1,
                                               "axes_dims_rope": [16, 8, 8], "max_resolution": [32, 32],
                                               "llama_layers": [0, 1] * d},
           (16, 8, 8), _hidream, note="mixture-of-experts blocks, four encoders"),
    Family("Qwen-Image", "QwenImage", lambda c, d: {"image_model": "qwen_image", "in_channels": 64,
                                                    "out_channels": 16, "num_layers": 2 * d,
                                                    "attention_head_dim": 32, "num_attention_heads": 2,
                                                    "joint_attention_dim": CTX, "axes_dims_rope": [8, 12, 12]},
           (16, 1, 8, 8), note="Wan latent space (5-D, one frame), flow shift 1.15"),
    Family("Qwen-Image Edit", "QwenImage", lambda c, d: {"image_model": "qwen_image", "in_channels": 64,
                                                         "out_channels": 16, "num_layers": 2 * d,
                                                         "attention_head_dim": 32, "num_attention_heads": 2,
                                                         "joint_attention_dim": CTX, "axes_dims_rope": [8, 12, 12]},
           (16, 1, 8, 8), lambda s, b, sh: {"reference_latents": [_randn(s + 21, 1, *sh)]},
           note="Qwen-Image with a reference latent (image editing)"),
    Family("WAN 2.1 T2V", "WAN21_T2V", lambda c, d: {"image_model": "wan2.1", "model_type": "t2v",
                                                     "patch_size": (1, 2, 2), "text_len": TOKENS, "in_dim": 16,
                                                     "dim": 64, "ffn_dim": 128, "freq_dim": 32, "text_dim": CTX,
                                                     "out_dim": 16, "num_heads": 2, "num_layers": 2 * d},
           (16, 2, 8, 8), note="5-D video latent, flow shift 8"),
    Family("WAN 2.1 I2V", "WAN21_I2V", lambda c, d: {"image_model": "wan2.1", "model_type": "i2v",
                                                     "patch_size": (1, 2, 2), "text_len": TOKENS, "in_dim": 36,
                                                     "dim": 64, "ffn_dim": 128, "freq_dim": 32, "text_dim": CTX,
                                                     "out_dim": 16, "num_heads": 2, "num_layers": 2 * d},
           (16, 2, 8, 8), _wan_i2v, note="image latent + mask concatenated, CLIP-vision branch (unused)"),
    Family("WAN 2.2 I2V 14B", "WAN21_I2V", lambda c, d: {"image_model": "wan2.1", "model_type": "t2v",
                                                     "patch_size": (1, 2, 2), "text_len": TOKENS, "in_dim": 36,
                                                     "dim": 64, "ffn_dim": 128, "freq_dim": 32, "text_dim": CTX,
                                                     "out_dim": 16, "num_heads": 2, "num_layers": 2 * d},
           (16, 2, 8, 8), _wan_i2v, note="image latent + mask concatenated (36 input channels)"),
    Family("WAN 2.2 T2V 5B", "WAN22_T2V", lambda c, d: {"image_model": "wan2.1", "model_type": "t2v",
                                                        "patch_size": (1, 2, 2), "text_len": TOKENS, "in_dim": 48,
                                                        "dim": 64, "ffn_dim": 128, "freq_dim": 32, "text_dim": CTX,
                                                        "out_dim": 48, "num_heads": 2, "num_layers": 2 * d},
           (48, 2, 8, 8), note="48-channel Wan 2.2 latent, per-token timesteps"),
    Family("HunyuanVideo", "HunyuanVideo", lambda c, d: {"image_model": "hunyuan_video", "in_channels": 16,
                                                         "out_channels": 16, "patch_size": [1, 2, 2],
                                                         "vec_in_dim": POOLED, "axes_dim": [8, 12, 12],
                                                         "meanflow": False, "context_in_dim": CTX,
                                                         "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2,
                                                         "depth": d, "depth_single_blocks": d, "theta": 256,
                                                         "qkv_bias": True, "byt5": False, "guidance_embed": True,
                                                         "use_cond_type_embedding": False, "vision_in_dim": None},
           (16, 2, 8, 8), lambda s, b, sh: _pooled(s, b, sh, 6.0),
           note="5-D video latent, guidance embedding"),
    Family("LTX-Video", "LTXV", lambda c, d: {"image_model": "ltxv", "in_channels": 128,
                                              "cross_attention_dim": 64, "attention_head_dim": 32,
                                              "num_attention_heads": 2, "caption_channels": CTX,
                                              "num_layers": 2 * d},
           (128, 2, 4, 4), _ltxv, note="128-channel 5-D latent, per-token timesteps"),
    Family("Cosmos Predict2", "CosmosT2IPredict2", lambda c, d: {
        "image_model": "cosmos_predict2", "max_img_h": 240, "max_img_w": 240, "max_frames": 128,
        "in_channels": 16, "out_channels": 16, "patch_spatial": 2, "patch_temporal": 1, "model_channels": 64,
        "concat_padding_mask": True, "crossattn_emb_channels": CTX, "pos_emb_cls": "rope3d",
        "pos_emb_learnable": True, "pos_emb_interpolation": "crop", "min_fps": 1, "max_fps": 30,
        "use_adaln_lora": True, "adaln_lora_dim": 16, "num_blocks": 2 * d, "num_heads": 2,
        "extra_per_block_abs_pos_emb": False, "rope_h_extrapolation_ratio": 4.0, "rope_w_extrapolation_ratio": 4.0,
        "rope_t_extrapolation_ratio": 1.0, "extra_h_extrapolation_ratio": 1.0, "extra_w_extrapolation_ratio": 1.0,
        "extra_t_extrapolation_ratio": 1.0, "rope_enable_fps_modulation": False},
           (16, 1, 8, 8), note="Cosmos flow (sigma up to 80), 5-D latent"),
    Family("Mochi", "GenmoMochi", lambda c, d: {"image_model": "mochi_preview", "depth": d, "patch_size": 2,
                                                "num_heads": 2, "hidden_size_x": 64, "hidden_size_y": 32,
                                                "mlp_ratio_x": 1536 * 8 / 64, "mlp_ratio_y": 2.0, "learn_sigma": False,
                                                "in_channels": 12, "qk_norm": True, "qkv_bias": False,
                                                "out_bias": True, "attn_drop": 0.0, "patch_embed_bias": True,
                                                "posenc_preserve_area": True, "timestep_mlp_bias": True,
                                                "attend_to_padding": False, "timestep_scale": 1000.0,
                                                "use_t5": True, "t5_feat_dim": CTX, "t5_token_length": TOKENS,
                                                "rope_theta": 10000.0},
           (12, 2, 8, 8), _mask, note="12-channel 5-D latent, attention mask"),
    Family("Kandinsky5", "Kandinsky5", lambda c, d: {"image_model": "kandinsky5", "in_visual_dim": 16,
                                                     "out_visual_dim": 16, "in_text_dim": CTX, "in_text_dim2": POOLED,
                                                     "time_dim": 32, "model_dim": 64, "ff_dim": 128,
                                                     "visual_embed_dim": 132, "patch_size": (1, 2, 2),
                                                     "num_text_blocks": 1, "num_visual_blocks": 2 * d,
                                                     "axes_dims": (8, 12, 12)},
           (16, 2, 8, 8), lambda s, b, sh: _pooled(s, b, sh), note="video, flow shift 10 (newer trees)"),
]
BY_NAME = {f.name: f for f in FAMILIES}
# families whose model takes a parameter dataclass: (module, class)
PARAMS = {"chroma": ("comfy.ldm.chroma.model", "ChromaParams"),
          "hunyuan_video": ("comfy.ldm.hunyuan_video.model", "HunyuanVideoParams")}


class Built(NamedTuple):
    model: object
    positive: Callable
    negative: Callable
    latent: Callable
    family: Family


def init_weights(module, seed):
    """Seeded, non-trivial init: matrices randn/sqrt(fan_in), biases 0, norm weights and scales 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim >= 2:
                param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(math.prod(param.shape[1:])))
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)
        for name, buf in module.named_buffers():  # uninitialised float buffers (learnable embeddings kept as buffers)
            if buf.is_floating_point() and not torch.isfinite(buf).all():
                buf.zero_()


def unavailable(name):
    """Why a family cannot be built on this ComfyUI (None: it can)."""
    import comfy.supported_models
    family = BY_NAME[name]
    if not hasattr(comfy.supported_models, family.config):
        return f"{name}: this ComfyUI has no supported_models.{family.config} (added in a later release)"
    if family.unet is None:
        return f"{name}: no tiny config written for it yet"
    return None


def _model(name, depth):
    """A new ComfyUI BaseModel of the family (weights uninitialised)."""
    import comfy.supported_models
    from bench import host
    compat = host.stride("nodes.compat")
    family = BY_NAME[name]
    reason = unavailable(name)
    if reason:
        raise LookupError(reason)
    unet_config = family.unet(compat, depth)
    params = PARAMS.get(unet_config.get("image_model"))
    if params is not None:  # fields newer trees added to the family's parameters (nodes/compat.py)
        module, cls = params
        unet_config = compat.params_config(getattr(importlib.import_module(module), cls), unet_config)
    config = getattr(comfy.supported_models, family.config)(unet_config)
    config.set_inference_dtype(torch.float32, None)
    return config.get_model({}, "", device=torch.device("cpu"))


@functools.lru_cache(maxsize=None)
def _weights(name, depth, seed):
    """The seeded weights of a family's tiny model (built once; each build copies them into a new model)."""
    model = _model(name, depth)
    init_weights(model.diffusion_model, seed)
    return {k: v.clone() for k, v in model.diffusion_model.state_dict().items()}


def build(name, depth=2, seed=0):
    """A new tiny model of `name` (its own BaseModel and ModelPatcher, so no test sees another's patches, and
    ComfyUI's model management frees both together); the same (name, depth, seed) gives the same weights."""
    import comfy.model_management as mm
    import comfy.model_patcher
    family = BY_NAME[name]
    model = _model(name, depth)
    model.diffusion_model.load_state_dict(_weights(name, depth, seed))
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())

    def conditioning(batch=1, seed=1):
        extras = family.extras(seed, batch, family.latent) if family.extras else {}
        return [[_randn(seed, batch, TOKENS, family.context), extras]]

    def latent(batch=1):
        return torch.zeros(batch, *family.latent)
    return Built(patcher, conditioning, functools.partial(conditioning, seed=2), latent, family)
