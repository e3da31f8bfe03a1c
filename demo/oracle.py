"""The exact oracle: a class-conditional Gaussian mixture whose denoiser E[x0 | x_sigma] is analytic.

Each component k is N(mu_k, U_k U_k^T + diag(d_k)) with weight pi_k and a digit label. For a noisy
state x = alpha * x0 + sigma * eps (alpha = 1 for EPS models, 1 - sigma for flow models),
x | k ~ N(alpha mu_k, C_k) with C_k = alpha^2 Sigma_k + sigma^2 I, and
    E[x0 | x] = sum_k w_k(x) (mu_k + alpha Sigma_k C_k^{-1} (x - alpha mu_k)),
w_k the posterior component weights. C_k^{-1} and log det C_k go through the Woodbury identity on
the rank-r factor, so a call costs O(batch x components x dim x rank). Everything runs in float64.
"""
import math
import os

import torch
from safetensors.torch import load_file

PARAMS = os.path.join(os.path.dirname(__file__), "oracle_gmm.safetensors")
UNCONDITIONAL = -1


def _per_row(v, batch):
    """A [batch] or, when all rows share it, a [1] float64 tensor (shared sigma: factor once)."""
    v = torch.as_tensor(v).reshape(-1)
    if v.numel() > 1 and bool((v == v[0]).all()):
        v = v[:1]
    if v.numel() not in (1, batch):
        raise ValueError(f"expected 1 or {batch} noise levels, got {v.numel()}")
    return v


class GaussianMixture(torch.nn.Module):
    """Gaussian mixture with low-rank plus diagonal covariances; label -1 means all components.

    The parameters are float64 buffers, so the module moves with the model between devices.
    """

    def __init__(self, means, factors, diag, weights, labels, latent_mean=None, latent_std=None):
        super().__init__()
        f64 = lambda t: t.to(torch.float64)
        self.register_buffer("means", f64(means))                  # [K, D]
        self.register_buffer("factors", f64(factors))              # [K, D, r]
        self.register_buffer("diag", f64(diag))                    # [K, D]
        self.register_buffer("log_weights", f64(weights).log())    # [K]
        self.register_buffer("labels", labels.to(torch.int64))     # [K] digit of each component
        k, d, r = factors.shape
        self.register_buffer("outer", torch.einsum("kdi,kdj->kdij", self.factors, self.factors).reshape(k, d, r * r))
        channels = 4 if latent_mean is None else latent_mean.numel()
        self.register_buffer("latent_mean", f64(latent_mean if latent_mean is not None else torch.zeros(channels)))
        self.register_buffer("latent_std", f64(latent_std if latent_std is not None else torch.ones(channels)))
        self.num_classes = int(self.labels.max()) + 1

    @classmethod
    def load(cls, path=PARAMS):
        t = load_file(path)
        return cls(t["means"], t["factors"], t["diag"], t["weights"], t["labels"], t["latent_mean"], t["latent_std"])

    @property
    def dim(self):
        return self.means.shape[1]

    def data_std(self):
        """Standard deviation of x0 pooled over all dimensions (the unit of Stride's error tables)."""
        w = self.log_weights.exp().view(-1, 1)
        second = (w * (self.factors.pow(2).sum(-1) + self.diag + self.means ** 2)).sum(0)
        mean = (w * self.means).sum(0)
        return (second - mean ** 2).mean().sqrt().item()

    def _component_log_prior(self, labels):
        """[B, K] log pi_k restricted to each row's label (all components for UNCONDITIONAL)."""
        labels = torch.as_tensor(labels, dtype=torch.int64, device=self.labels.device).view(-1, 1)
        keep = (labels == UNCONDITIONAL) | (labels == self.labels.view(1, -1))
        prior = self.log_weights.view(1, -1).masked_fill(~keep, -math.inf)
        return prior - torch.logsumexp(prior, dim=1, keepdim=True)

    def _posterior(self, x, sigma, alpha, labels):
        """Per-component log N(x; alpha mu_k, C_k) pieces: returns (log weights [B,K], C^-1 r [B,K,D])."""
        a, s = alpha.view(-1, 1, 1), sigma.view(-1, 1, 1)
        U = self.factors
        dp = a ** 2 * self.diag.unsqueeze(0) + s ** 2                      # [B, K, D]
        r = x.unsqueeze(1) - a * self.means.unsqueeze(0)                   # [B, K, D]
        dinv_r = r / dp
        rank = U.shape[-1]
        utdu = torch.einsum("bkd,kdq->bkq", 1.0 / dp, self.outer).view(*dp.shape[:2], rank, rank)
        m = torch.eye(rank, dtype=x.dtype, device=x.device) + a.unsqueeze(-1) ** 2 * utdu
        chol = torch.linalg.cholesky(m)
        y = torch.cholesky_solve((a * torch.einsum("kdi,bkd->bki", U, dinv_r)).unsqueeze(-1), chol)
        cinv_r = dinv_r - a * torch.einsum("kdi,bki->bkd", U, y.squeeze(-1)) / dp
        logdet = dp.log().sum(-1) + 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        log_n = -0.5 * ((r * cinv_r).sum(-1) + logdet + self.dim * math.log(2 * math.pi))
        return self._component_log_prior(labels) + log_n, cinv_r

    def log_prob(self, x, sigma, alpha, labels):
        """log p(x_sigma) of the noised mixture; x [B, D], sigma/alpha [B], labels [B]."""
        logits, _ = self._posterior(x, sigma, alpha, labels)
        return torch.logsumexp(logits, dim=1)

    def denoise(self, x, sigma, alpha, labels):
        """E[x0 | x] for x = alpha x0 + sigma eps; x [B, ...] flattened to D, returns x's shape and dtype."""
        shape, dtype = x.shape, x.dtype
        x = x.reshape(shape[0], -1).to(self.means)
        sigma, alpha = _per_row(sigma, shape[0]).to(x), _per_row(alpha, shape[0]).to(x)
        logits, cinv_r = self._posterior(x, sigma, alpha, labels)
        w = torch.softmax(logits, dim=1)                                   # [B, K]
        ut_cinv_r = torch.einsum("kdi,bkd->bki", self.factors, cinv_r)
        sigma_cinv_r = torch.einsum("kdi,bki->bkd", self.factors, ut_cinv_r) + self.diag * cinv_r
        x0 = self.means.unsqueeze(0) + alpha.view(-1, 1, 1) * sigma_cinv_r
        return (w.unsqueeze(-1) * x0).sum(1).reshape(shape).to(dtype)

    def guided_denoise(self, x, sigma, alpha, labels, scale):
        """Classifier-free guidance, exact: uncond + scale (cond - uncond); at scale 1 the conditional alone."""
        cond = self.denoise(x, sigma, alpha, labels)
        if scale == 1.0:
            return cond
        uncond = self.denoise(x, sigma, alpha, torch.full_like(torch.as_tensor(labels), UNCONDITIONAL))
        return uncond + scale * (cond - uncond)

    def sample(self, n, labels, generator=None):
        """Draw x0 ~ the (conditional) mixture; labels [n] (UNCONDITIONAL allowed)."""
        probs = self._component_log_prior(labels).exp().cpu()
        k = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        z_low = torch.randn(n, self.factors.shape[-1], generator=generator).to(self.means)
        z_diag = torch.randn(n, self.dim, generator=generator).to(self.means)
        k = k.to(self.means.device)
        return self.means[k] + torch.einsum("ndi,ni->nd", self.factors[k], z_low) \
            + self.diag[k].sqrt() * z_diag
