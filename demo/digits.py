"""The digits latent space: 8x8 digits upsampled to 16x16, packed 2x2 space-to-depth into [4, 8, 8].

Decoding is exact (depth-to-space), so a latent is an image. The per-channel normalization constants
are stored with the oracle's parameters (demo/oracle_gmm.safetensors).
"""
import torch
import torch.nn.functional as F

LATENT_SHAPE = (4, 8, 8)
PIXEL_MAX = 16.0  # scikit-learn digits take values 0..16


def encode(images, mean, std):
    """[B, 8, 8] digit images (0..16) -> normalized latents [B, 4, 8, 8]."""
    x = images.to(torch.float64).unsqueeze(1) / PIXEL_MAX
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    z = F.pixel_unshuffle(x, 2)
    return (z - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def decode(latents, mean, std):
    """Normalized latents [B, 4, 8, 8] -> grey images [B, 16, 16] in [0, 1] (unclamped)."""
    if latents.ndim != 4 or tuple(latents.shape[1:]) != LATENT_SHAPE:
        raise ValueError(f"digits latents have shape [batch, 4, 8, 8]; got {list(latents.shape)}")
    z = latents * std.view(1, -1, 1, 1).to(latents) + mean.view(1, -1, 1, 1).to(latents)
    return F.pixel_shuffle(z, 2)[:, 0]
