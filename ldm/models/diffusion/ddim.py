"""CompVis-compatible DDIM sampler over ``sampling.sample_ddim``."""
from __future__ import annotations

from typing import Any

import torch

from ldm.models.diffusion.guidance import CompVisSampler
from ldm.models.diffusion.sampling import EpsFn, sample_ddim


class DDIMSampler(CompVisSampler):
    name = "ddim"

    def run(self, eps_fn: EpsFn, x_T: torch.Tensor, timesteps, eta: float = 0.0,
            generator: torch.Generator | None = None, **kwargs: Any) -> tuple[torch.Tensor, dict]:
        return sample_ddim(eps_fn, x_T, self.model.alphas_cumprod, timesteps, eta=eta, generator=generator, **kwargs)
