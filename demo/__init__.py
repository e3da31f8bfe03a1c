"""Stride's embedded default: the digits latent codec and the exact Gaussian-mixture oracle."""
