"""Bridge: Stride's embedded trained models, built from ComfyUI's own architecture classes.

Two families, each with a large and a small size sharing latent space, parameterization and
conditioning format (so trajectory stitching can pair them):
- `unet_*`: ComfyUI's SD1.5 UNet (`comfy.supported_models.SD15`), EPS, SD1.5 discrete schedule;
- `dit_*`: ComfyUI's Flux DiT (`comfy.supported_models.Flux`, double and single blocks), rectified flow.
Both work on the [4, 8, 8] digits latent with an identity latent format. The condition is a digit label
through a learned embedding (row 10 = the null condition), stored with the weights in
demo/weights/<name>.safetensors; the training program is demo/train.py.
"""
import json
import math
import os

import torch
from safetensors import safe_open
from safetensors.torch import load_file

import comfy.latent_formats
import comfy.ldm.modules.attention
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models

from .compat import flux_unet_config, load_diffusion_weights, shipped_state  # noqa: F401 (demo/train.py)

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo", "weights")
NULL_LABEL = 10

_UNET_BASE = {
    "image_size": 8, "in_channels": 4, "out_channels": 4, "num_res_blocks": [1, 1], "channel_mult": [1, 2],
    "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1], "transformer_depth_middle": 1,
    "use_linear_in_transformer": True, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "use_temporal_attention": False, "use_temporal_resblock": False,
    "use_checkpoint": False, "context_dim": 64,
}
_DIT_BASE = {
    "image_model": "flux", "guidance_embed": False, "in_channels": 4, "out_channels": 4, "vec_in_dim": 32,
    "context_in_dim": 32, "mlp_ratio": 2.0, "theta": 10000, "patch_size": 2, "qkv_bias": True,
}
SPECS = {
    "unet_small": {"family": "unet", "unet_config": {**_UNET_BASE, "model_channels": 32}},
    "unet_large": {"family": "unet", "unet_config": {**_UNET_BASE, "model_channels": 64}},
    "dit_small": {"family": "dit", "unet_config": {**_DIT_BASE, "hidden_size": 64, "num_heads": 2,
                                                    "axes_dim": [8, 12, 12], "depth": 2, "depth_single_blocks": 2}},
    "dit_large": {"family": "dit", "unet_config": {**_DIT_BASE, "hidden_size": 128, "num_heads": 4,
                                                    "axes_dim": [8, 12, 12], "depth": 3, "depth_single_blocks": 3}},
}


def weights_path(name):
    return os.path.join(WEIGHTS_DIR, f"{name}.safetensors")


def build_base_model(name):
    """The untrained ComfyUI BaseModel for `name` (float32, CPU), with an identity 4-channel latent format."""
    if name not in SPECS:
        raise ValueError(f"unknown Stride model {name!r}; choose one of {list(SPECS)}")
    spec = SPECS[name]
    if spec["family"] == "unet":
        config = comfy.supported_models.SD15(dict(spec["unet_config"]))
    else:
        config = comfy.supported_models.Flux(flux_unet_config(spec["unet_config"]))
    config.set_inference_dtype(torch.float32, None)
    config.latent_format = comfy.latent_formats.LatentFormat()
    return config.get_model({}, "", device=torch.device("cpu"))


class LabelEmbedding(torch.nn.Module):
    """Digit label -> the model's conditioning: context tokens [B, 1, C] (and a pooled vector for the DiT)."""

    def __init__(self, context_dim, pooled_dim=None):
        super().__init__()
        self.context = torch.nn.Embedding(NULL_LABEL + 1, context_dim)
        self.pooled = torch.nn.Embedding(NULL_LABEL + 1, pooled_dim) if pooled_dim else None

    def conditioning(self, labels):
        """CONDITIONING for labels [B] (NULL_LABEL = unconditional)."""
        labels = torch.as_tensor(labels, dtype=torch.int64).view(-1)
        with torch.no_grad():
            extras = {} if self.pooled is None else {"pooled_output": self.pooled(labels).float()}
            return [[self.context(labels).unsqueeze(1).float(), extras]]


def label_embedding_for(name):
    config = SPECS[name]["unet_config"]
    if SPECS[name]["family"] == "unet":
        return LabelEmbedding(config["context_dim"])
    return LabelEmbedding(config["context_in_dim"], config["vec_in_dim"])


def init_weights(model, embedding, seed):
    """Seeded start for training: matrices randn/sqrt(fan_in), biases 0, norm weights and RMSNorm scales 1,
    output layers zero (ComfyUI's ops leave layers uninitialized)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in list(model.diffusion_model.named_parameters()) + list(embedding.named_parameters()):
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(math.prod(p.shape[1:])))
            elif pname.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
        for pname, p in model.diffusion_model.named_parameters():
            if pname.startswith(("out.2.", "final_layer.")):
                p.zero_()


def load_model(name):
    """(ModelPatcher, LabelEmbedding) of a trained Stride model; a clear error when its weights are missing."""
    path = weights_path(name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Stride model weights {path} are missing: run `.venv/bin/python -m demo.train`")
    model, embedding = build_base_model(name), label_embedding_for(name)
    tensors = load_file(path)
    emb = {k[len("embedding."):]: v.float() for k, v in tensors.items() if k.startswith("embedding.")}
    net = {k[len("diffusion_model."):]: v.float() for k, v in tensors.items() if k.startswith("diffusion_model.")}
    embedding.load_state_dict(emb)
    missing, unexpected = load_diffusion_weights(model.model_config, model.diffusion_model, net)
    if missing or unexpected:
        raise ValueError(f"{path} does not match the {name} architecture (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}); retrain with demo/train.py")
    return _patcher(model), embedding


def _patcher(model):
    model.diffusion_model.requires_grad_(False)  # inference only (samplers without no_grad would keep graphs)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def load_embedding(name):
    """The LabelEmbedding of `name` alone (without building its network)."""
    path = weights_path(name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Stride model weights {path} are missing: run `.venv/bin/python -m demo.train`")
    embedding = label_embedding_for(name)
    with safe_open(path, "pt") as f:
        embedding.load_state_dict({k[len("embedding."):]: f.get_tensor(k).float() for k in f.keys()
                                   if k.startswith("embedding.")})
    return embedding


# Stitching a small model with its large sibling (T-Stitch) needs one conditioning for both. The condition
# reaches each network only through linear layers applied to it first, so a linear map A with
# A e_large(label) = e_small(label) for all 11 labels, folded into those layers (W' = W A), makes the small
# network compute on the large embedding exactly what it computed on its own. 11 rows in C >= 11 dimensions:
# exact up to float rounding.
MAX_MAP_RESIDUAL = 1e-4


def sibling_pair(small_name, large_name):
    """Check that (small_name, large_name) is a small model and its large sibling of one family."""
    for name in (small_name, large_name):
        if name not in SPECS:
            raise ValueError(f"unknown Stride model {name!r}; shared conditioning pairs the trained models "
                             f"{list(SPECS)}")
    family = SPECS[small_name]["family"]
    if small_name != f"{family}_small" or large_name != f"{family}_large":
        raise ValueError(f"shared conditioning maps a small model onto its large sibling of the same family "
                         f"(unet_small -> unet_large, dit_small -> dit_large); got {small_name} -> {large_name}")


def conditioning_maps(small_name, large_name):
    """{part: (A, relative residual)} for the embedding's parts ("context", and "pooled" for the DiT): the
    [C, C] float64 map with A e_large = e_small on all 11 label rows (minimum-norm least squares); a
    ValueError when a map is not exact to MAX_MAP_RESIDUAL."""
    sibling_pair(small_name, large_name)
    small, large = load_embedding(small_name), load_embedding(large_name)
    maps = {}
    for part in ("context", "pooled"):
        if getattr(small, part) is None:
            continue
        e_small = getattr(small, part).weight.detach().double()
        e_large = getattr(large, part).weight.detach().double()
        a_t = torch.linalg.lstsq(e_large, e_small, driver="gelsd").solution  # e_large @ A^T = e_small
        residual = ((e_large @ a_t - e_small).norm() / e_small.norm()).item()
        if not residual <= MAX_MAP_RESIDUAL:
            raise ValueError(f"the {large_name} {part} embedding cannot be mapped exactly onto the {small_name} one "
                             f"(relative residual {residual:.2e} > {MAX_MAP_RESIDUAL:g}): its label rows are not "
                             "linearly independent")
        maps[part] = (a_t.T.contiguous(), residual)
    return maps


def conditioning_inputs(diffusion_model, family):
    """{part: [Linear]}: the layers that first see each part of the conditioning (every cross-attention's
    to_k / to_v for the UNet's context; the DiT's txt_in for the context and vector_in.in_layer for the pooled
    vector)."""
    if family == "dit":
        return {"context": [diffusion_model.txt_in], "pooled": [diffusion_model.vector_in.in_layer]}
    blocks = [m for m in diffusion_model.modules() if isinstance(m, comfy.ldm.modules.attention.BasicTransformerBlock)]
    return {"context": [layer for b in blocks for layer in (b.attn2.to_k, b.attn2.to_v)]}


def adopt_conditioning(small, small_name, large_name):
    """A new ModelPatcher of the small model `small` (a ModelPatcher or BaseModel of `small_name`) re-expressed to
    take the conditioning of `large_name` (its large sibling): the map A of each conditioning part folded into
    the layers that first see it (W' = W A), on a fresh copy of the weights (`small` is left untouched)."""
    sibling_pair(small_name, large_name)
    maps = conditioning_maps(small_name, large_name)
    source = getattr(small, "model", small)
    folded = build_base_model(small_name)
    try:
        folded.diffusion_model.load_state_dict(source.diffusion_model.state_dict())
    except RuntimeError as error:
        raise ValueError(f"the model given to adopt_conditioning is not a {small_name}: {error}") from None
    layers = conditioning_inputs(folded.diffusion_model, SPECS[small_name]["family"])
    with torch.no_grad():
        for part, (a, _) in maps.items():
            if not layers.get(part):
                raise ValueError(f"{small_name}: no layer takes the {part} conditioning")
            for layer in layers[part]:
                if layer.weight.shape[1] != a.shape[0]:
                    raise ValueError(f"{small_name}: {part} layer of width {layer.weight.shape[1]}, "
                                     f"map of {a.shape[0]}")
                layer.weight.copy_((layer.weight.double() @ a).to(layer.weight.dtype))
    return _patcher(folded)


def weights_metadata(name):
    """The training settings stored with the weights."""
    from safetensors import safe_open
    with safe_open(weights_path(name), "pt") as f:
        meta = f.metadata() or {}
    return {k: json.loads(v) if v[:1] in "[{" else v for k, v in meta.items()}
