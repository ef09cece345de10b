"""Classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598), written once for every sampler,
and the CompVis-compatible sampler front end built on it."""
from __future__ import annotations

from typing import Any, Callable

import torch

from ldm.models.diffusion.sampling import EpsFn, ddim_timesteps
from ldm.modules.attention import reuse_context_kv


def guided_eps_fn(model: Any, cond: torch.Tensor | None, uncond: torch.Tensor | None,
                  scale: float) -> EpsFn:
    """eps(x, t) = e_u + s (e_c - e_u), both from one batched forward on cat([x, x]).

    ``model.apply_model(x, t, c)`` predicts eps; with ``uncond`` None or s == 1 it is called once.
    """
    if uncond is None or scale == 1.0:
        return lambda x, t: model.apply_model(x, t, cond)
    c_in = torch.cat([uncond, cond])                              # (2B, L, D), the same every step

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x_in, t_in = torch.cat([x, x]), torch.cat([t, t])        # (2B, C, H, W), (2B,)
        e_u, e_c = model.apply_model(x_in, t_in, c_in).chunk(2)
        return e_u + scale * (e_c - e_u)

    return eps_fn


class CompVisSampler:
    """The ``DDIMSampler(model).sample(S, batch_size, shape, conditioning, ...)`` front end of the
    CompVis repositories over the pure sampling functions; subclasses pick the function."""

    name = "sampler"

    def __init__(self, model: Any, schedule: str = "linear", **kwargs: Any):
        self.model = model

    def sample(self, S: int, batch_size: int, shape: tuple[int, int, int], conditioning: Any = None,
               callback: Callable[[int], None] | None = None, img_callback: Callable | None = None,
               eta: float = 0.0, x_T: torch.Tensor | None = None, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Any = None, verbose: bool = True, log_every_t: int = 100,
               generator: torch.Generator | None = None, **unsupported: Any) -> tuple[torch.Tensor, dict]:
        """Sample ``batch_size`` latents of ``shape`` (C, H, W) in S steps; returns (samples, intermediates)."""
        if unsupported:
            raise TypeError(f"{type(self).__name__}.sample: unsupported arguments {sorted(unsupported)}")
        device = self.model.device
        if x_T is None:
            x_T = torch.randn((batch_size, *shape), generator=generator, device=device)
        elif tuple(x_T.shape) != (batch_size, *shape):
            raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {(batch_size, *shape)}")
        eps_fn = guided_eps_fn(self.model, conditioning, unconditional_conditioning, unconditional_guidance_scale)
        timesteps = ddim_timesteps(self.model.num_timesteps, S)

        def step_callback(i: int, x: torch.Tensor, pred_x0: torch.Tensor) -> None:
            if callback is not None:
                callback(i)
            if img_callback is not None:
                img_callback(pred_x0, i)

        with torch.no_grad(), reuse_context_kv(self.model):  # the context's K, V once for all steps
            return self.run(eps_fn, x_T, timesteps, eta=eta, generator=generator, callback=step_callback,
                            log_every_t=log_every_t, progress=verbose)

    def run(self, eps_fn: EpsFn, x_T: torch.Tensor, timesteps, **kwargs: Any) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError
