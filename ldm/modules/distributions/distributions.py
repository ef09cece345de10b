"""The KL autoencoder's posterior q(z|x) = N(mu, diag(sigma^2)) (Rombach et al. 2022, arXiv 2112.10752,
sec. 3 and app. G; Kingma & Welling 2014, arXiv 1312.6114, eq. 10 and app. B for the KL term)."""
from __future__ import annotations

import math

import torch


class DiagonalGaussianDistribution:
    """N(mean, exp(logvar)) per element, from ``parameters`` = cat([mean, logvar], dim=1).

    ``logvar`` is clamped to [-30, 20] as in CompVis. ``deterministic`` makes the variance zero,
    so ``sample()`` returns the mean and ``kl()`` / ``nll()`` return zeros.
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters  # (B, 2C, H, W)
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)  # (B, C, H, W) each
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        if deterministic:
            self.std = self.var = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * eps, eps ~ N(0, I) drawn on the generator's device, then moved to the mean's."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)  # (B, C, H, W)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL(self || other) summed over C, H, W -> (B,); ``other`` defaults to N(0, I)."""
        if self.deterministic:
            return self.mean.new_zeros(self.mean.shape[0])
        if other is None:
            terms = self.mean.pow(2) + self.var - 1.0 - self.logvar
        else:
            terms = ((self.mean - other.mean).pow(2) + self.var) / other.var - 1.0 - self.logvar + other.logvar
        return 0.5 * terms.sum(dim=(1, 2, 3))

    def nll(self, sample: torch.Tensor, dims: tuple[int, ...] = (1, 2, 3)) -> torch.Tensor:
        """-log N(sample; mean, var) summed over ``dims``."""
        if self.deterministic:
            return self.mean.new_zeros(self.mean.shape[0])
        terms = math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var
        return 0.5 * terms.sum(dim=dims)
