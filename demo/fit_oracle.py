"""Fit the exact oracle: a class-conditional Gaussian mixture on the digits latent space.

Each digit gets COMPONENTS components (k-means on its latents); each component is a Gaussian with a
low-rank plus diagonal covariance U U^T + diag(d) (probabilistic PCA of rank RANK), with a variance
floor of FLOOR x the data variance so the guided ODE stays well-conditioned near sigma_min.
Writes demo/oracle_gmm.safetensors. Needs scikit-learn (the `test` extra); seeded and reproducible:
    .venv/bin/python -m demo.fit_oracle
"""
import os

import numpy as np
import torch
from safetensors.torch import save_file
from sklearn.cluster import KMeans
from sklearn.datasets import load_digits

from .digits import encode

COMPONENTS, RANK, FLOOR, SEED = 4, 6, 1e-2, 0
OUT = os.path.join(os.path.dirname(__file__), "oracle_gmm.safetensors")


def fit():
    data = load_digits()
    images = torch.tensor(data.images)
    labels = np.asarray(data.target)
    raw = encode(images, torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64))
    mean, std = raw.mean(dim=(0, 2, 3)), raw.std(dim=(0, 2, 3))
    z = encode(images, mean, std).flatten(1).numpy()
    floor = FLOOR * z.var(axis=0).mean()
    means, factors, diags, weights, comp_labels = [], [], [], [], []
    for digit in range(10):
        zd = z[labels == digit]
        assign = KMeans(COMPONENTS, n_init=10, random_state=SEED).fit_predict(zd)
        for k in range(COMPONENTS):
            zk = zd[assign == k]
            mu = zk.mean(axis=0)
            cov = np.cov(zk - mu, rowvar=False, bias=True)
            evals, evecs = np.linalg.eigh(cov)
            evals, evecs = evals[::-1], evecs[:, ::-1]
            resid = np.maximum(cov.diagonal() - (evecs[:, :RANK] ** 2 * evals[:RANK]).sum(1), 0.0)
            d = resid + floor
            factors.append(evecs[:, :RANK] * np.sqrt(np.maximum(evals[:RANK] - floor, 0.0)))
            means.append(mu)
            diags.append(d)
            weights.append(len(zk) / len(z))
            comp_labels.append(digit)
    t = lambda a, dt=torch.float32: torch.tensor(np.asarray(a), dtype=dt).contiguous()
    tensors = {"means": t(means), "factors": t(factors), "diag": t(diags), "weights": t(weights),
               "labels": t(comp_labels, torch.int64), "latent_mean": t(mean), "latent_std": t(std)}
    meta = {"components_per_digit": str(COMPONENTS), "rank": str(RANK), "floor": str(FLOOR),
            "seed": str(SEED), "source": "scikit-learn load_digits (1797 images)"}
    save_file(tensors, OUT, metadata=meta)
    print(f"wrote {OUT}: {len(means)} components, rank {RANK}, variance floor {floor:.4g}")


if __name__ == "__main__":
    fit()
