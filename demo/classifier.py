"""A small digit classifier on the [4, 8, 8] digits latent, the judge of the quality benchmark.

An MLP on the flattened latent with a penultimate feature layer: `logits(x)` for the accuracy of
generated digits w.r.t. their requested label, `features(x)` for the Frechet distance between
generated and real latents. Pure PyTorch; trained by demo/train.py on the training split only.
"""
import os

import torch
from safetensors.torch import load_file

from .digits import LATENT_SHAPE

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "classifier.safetensors")
INPUTS = LATENT_SHAPE[0] * LATENT_SHAPE[1] * LATENT_SHAPE[2]
HIDDEN, FEATURES, CLASSES = 256, 64, 10


class DigitClassifier(torch.nn.Module):
    def __init__(self, dropout=0.0):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(INPUTS, HIDDEN), torch.nn.SiLU(), torch.nn.Dropout(dropout),
            torch.nn.Linear(HIDDEN, FEATURES), torch.nn.SiLU())
        self.head = torch.nn.Sequential(torch.nn.Dropout(dropout), torch.nn.Linear(FEATURES, CLASSES))

    def features(self, x):
        """Penultimate activations [B, FEATURES] of latents [B, 4, 8, 8]."""
        return self.body(x.float())

    def forward(self, x):
        return self.head(self.features(x))

    @torch.no_grad()
    def predict(self, x):
        return self(x).argmax(dim=-1)

    @torch.no_grad()
    def accuracy(self, x, labels):
        return (self.predict(x) == torch.as_tensor(labels).view(-1)).float().mean().item()


def load(path=PATH):
    """The trained classifier (eval mode); a clear error when its weights are missing."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"digit classifier weights {path} are missing: run "
                                "`.venv/bin/python -m demo.train --only classifier`")
    model = DigitClassifier()
    model.load_state_dict({k: v.float() for k, v in load_file(path).items()})
    return model.eval()
