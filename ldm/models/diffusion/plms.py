"""CompVis-compatible PLMS sampler over ``sampling.sample_plms``."""
from __future__ import annotations

from typing import Any

import torch

from ldm.models.diffusion.guidance import CompVisSampler
from ldm.models.diffusion.sampling import EpsFn, sample_plms


class PLMSSampler(CompVisSampler):
    name = "plms"

    def run(self, eps_fn: EpsFn, x_T: torch.Tensor, timesteps, eta: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, dict]:
        if eta != 0:
            raise ValueError(f"PLMS is deterministic: eta must be 0, got {eta}")
        kwargs.pop("generator", None)
        return sample_plms(eps_fn, x_T, self.model.alphas_cumprod, timesteps, **kwargs)
