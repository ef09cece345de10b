"""Sampling during a training run, shared by the callbacks that make images (class images, sample grids).

Image i starts from x_T ~ N(0, I) drawn by its own generator, seeded with ``seeds[i]`` on the CPU
(so the noise is the same on every device and for any batch composition). DDIM with classifier-free
guidance (``DDIMSampler``) then denoises it. The global RNG is never drawn from, and its state is
restored anyway (``sampling_mode``), so a training run that samples images draws the same training
noise as one that does not.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from core.images import to_uint8
from ldm.models.diffusion.ddim import DDIMSampler


def data_size(model: Any) -> int:
    """The image size the model was trained for: latent ``image_size`` times f (512 for sd-v1)."""
    return model.image_size * model.first_stage_model.factor


@contextlib.contextmanager
def sampling_mode(model: Any) -> Iterator[None]:
    """Eval mode, no gradients, EMA weights (when the model keeps them), global RNG states kept;
    the model's train/eval mode and weights are restored after."""
    was_training = model.training
    cuda = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.no_grad(), model.ema_scope():
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)


def initial_noise(seeds: Sequence[int], shape: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """x_T of each image from its own CPU generator: (N, C, h, w)."""
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(noise).to(device)


def sample_images(model: Any, prompts: Sequence[str], seeds: Sequence[int], size: int, steps: int = 50,
                  scale: float = 7.5, eta: float = 0.0, negative_prompt: str = "") -> np.ndarray:
    """One image per (prompt, seed) as uint8 (N, size, size, 3). Call inside ``sampling_mode``.

    With eta > 0 DDIM adds noise at every step; images are then made one at a time, each with a
    generator seeded by its own seed, so an image still depends on its seed only.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"sample_images: {len(prompts)} prompts but {len(seeds)} seeds")
    factor = model.first_stage_model.factor
    if size % factor:
        raise ValueError(f"image size {size} must be a multiple of the VAE factor {factor}")
    if eta > 0 and len(prompts) > 1:
        return np.concatenate([sample_images(model, [p], [s], size, steps, scale, eta, negative_prompt)
                               for p, s in zip(prompts, seeds)])
    shape = (model.channels, size // factor, size // factor)
    x_T = initial_noise(seeds, shape, model.device)  # (N, C, h, w)
    c = model.get_learned_conditioning(list(prompts))  # (N, 77, D)
    uc = model.get_learned_conditioning([negative_prompt] * len(prompts)) if scale != 1.0 else None
    generator = torch.Generator(model.device).manual_seed(int(seeds[0]))
    z, _ = DDIMSampler(model).sample(S=steps, batch_size=len(prompts), shape=shape, conditioning=c,
                                     unconditional_guidance_scale=scale, unconditional_conditioning=uc,
                                     eta=eta, x_T=x_T, generator=generator, verbose=False)
    return to_uint8(model.decode_first_stage(z))  # (N, size, size, 3)
