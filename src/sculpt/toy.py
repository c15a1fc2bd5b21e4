"""Gaussian-mixture data with its exact denoiser: the ground truth samplers are tested against.

Noising a mixture of Gaussians with x = x0 + sigma * eps gives another mixture,
p_sigma = sum_k w_k N(mu_k, S_k + sigma^2 I), and the ideal denoiser is closed form:

    E[x0 | x] = sum_k r_k(x) (mu_k + S_k (S_k + sigma^2 I)^{-1} (x - mu_k)),

with r_k the posterior responsibilities. No network, no training: any error a
sampler shows is the sampler's own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["GaussianMixture"]


@dataclass(frozen=True)
class GaussianMixture:
    """Weights [K], means [K, D], covariances [K, D, D] (float64)."""

    weights: Tensor
    means: Tensor
    covs: Tensor

    @classmethod
    def make(
        cls,
        weights: list[float] | Tensor,
        means: list[list[float]] | Tensor,
        stds: list[float] | Tensor,
    ) -> GaussianMixture:
        """Isotropic components: N(means[k], stds[k]^2 I)."""
        weights = torch.as_tensor(weights, dtype=torch.float64)
        means = torch.as_tensor(means, dtype=torch.float64)
        stds = torch.as_tensor(stds, dtype=torch.float64)
        eye = torch.eye(means.shape[1], dtype=torch.float64)
        return cls(weights / weights.sum(), means, stds[:, None, None] ** 2 * eye)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def mean(self) -> Tensor:
        return self.weights @ self.means

    @property
    def cov(self) -> Tensor:
        centred = self.means - self.mean
        between = torch.einsum("k,ki,kj->ij", self.weights, centred, centred)
        return torch.einsum("k,kij->ij", self.weights, self.covs) + between

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """n samples [n, D] and the component each came from [n]."""
        component = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        chol = torch.linalg.cholesky(self.covs)[component]
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[component] + (chol @ z[..., None])[..., 0], component

    def _eigen(self) -> tuple[Tensor, Tensor]:
        """S_k = Q_k diag(lam_k) Q_k^T: then S_k + sigma^2 I is diagonal in the same basis."""
        lam, Q = torch.linalg.eigh(self.covs)
        return lam.clamp(min=0), Q

    def _rotated(self, x: Tensor) -> Tensor:
        """Q_k^T (x - mu_k) for every sample and component: [B, K, D]."""
        _, Q = self._eigen()
        return torch.einsum("kji,bkj->bki", Q, x[:, None, :] - self.means[None])

    def log_prob(self, x: Tensor, sigma: Tensor | float = 0.0) -> Tensor:
        """log p_sigma(x) for x [B, D] (exact, float64)."""
        x = x.to(torch.float64).reshape(x.shape[0], -1)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(x.shape[0])
        return torch.logsumexp(self._component_log_probs(x, sigma), dim=1)

    def _component_log_probs(self, x: Tensor, sigma: Tensor, rotated: Tensor | None = None) -> Tensor:
        lam, _ = self._eigen()
        var = lam[None] + (sigma**2)[:, None, None]  # [B, K, D]
        y = self._rotated(x) if rotated is None else rotated
        return torch.log(self.weights)[None] - 0.5 * (
            (y**2 / var).sum(-1) + torch.log(var).sum(-1) + self.dim * math.log(2 * math.pi)
        )

    def responsibilities(self, x: Tensor, sigma: Tensor | float = 0.0) -> Tensor:
        """Posterior probability of each component given x: [B, K]."""
        x = x.to(torch.float64).reshape(x.shape[0], -1)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(x.shape[0])
        return torch.softmax(self._component_log_probs(x, sigma), dim=1)

    def denoiser(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """The exact E[x0 | x] at noise level sigma (per sample); x may be [B, D] or [B, ...].

        At sigma = inf the state holds pure noise (sculpt's convention) and carries no
        information: the answer is the mixture mean.
        """
        shape, dtype = x.shape, x.dtype
        x = x.to(torch.float64).reshape(shape[0], -1)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device="cpu").expand(shape[0]).clone()
        out = self.mean.expand(shape[0], -1).clone()
        finite = torch.isfinite(sigma)
        if finite.any():
            xf, sf = x[finite], sigma[finite]
            lam, Q = self._eigen()
            y = self._rotated(xf)  # [B, K, D] in each component's eigenbasis
            resp = torch.softmax(self._component_log_probs(xf, sf, y), dim=1)  # [B, K]
            gain = lam[None] / (lam[None] + (sf**2)[:, None, None])  # S (S + s^2 I)^-1, diagonal
            posterior_means = self.means[None] + torch.einsum("kij,bkj->bki", Q, gain * y)  # [B, K, D]
            out[finite] = (resp[..., None] * posterior_means).sum(1)
        return out.reshape(shape).to(dtype)
