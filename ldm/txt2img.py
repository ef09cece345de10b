"""Text to image: the one path from prompts and seeds to images, taken by ``scripts/sample.py``, the
training-time sample grids (``ImageLogger``), the class images (``ClassImageSampler``) and the toy
evaluation, so the same prompt, seed and settings give the same image in every entry point.

1. Image i starts from x_T ~ N(0, I) drawn by its own CPU generator seeded with ``seeds[i]``, then
   moved to the model's device: the noise is the same on every device and for any batch.
2. The prompts (and the negative prompt, the unconditional side of classifier-free guidance, when
   the scale is not 1) are encoded, and DDIM or PLMS denoises the batch (``ldm.models.diffusion``).
3. With eta > 0 DDIM adds noise at every step; the images are then made one at a time, each with a
   generator on the model's device seeded by its own seed, so an image still depends on its seed only.
4. The VAE decodes the latents to uint8 pixels.

A model that stores weights in 16 bit (``frozen_dtype`` while fitting) samples under autocast to
that dtype on its device, unless a 16-bit autocast is already on (``ClassImageSampler``'s).

The global RNG is never drawn from, and ``sampling_mode`` restores its state anyway, so a training
run that samples images draws the same training noise as one that does not.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from core.images import to_uint8
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.plms import PLMSSampler

SAMPLERS = {"ddim": DDIMSampler, "plms": PLMSSampler}


def trained_resolution(model: Any) -> int:
    """The image resolution the model was trained for: latent ``image_size`` times f (512 for sd-v1)."""
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


def weights_autocast(model: Any) -> contextlib.AbstractContextManager:
    """Autocast to the dtype of the model's 16-bit weights, if it has any and no 16-bit autocast is on."""
    half = (torch.float16, torch.bfloat16)
    low = [p.dtype for p in model.parameters() if p.dtype in half]
    device = model.device.type
    if not low or (torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) in half):
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=low[0])


def initial_noise(seeds: Sequence[int], shape: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """x_T of each image from its own CPU generator (step 1): (N, C, h, w)."""
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(noise).to(device)


def check_settings(model: Any, H: int, W: int, sampler: str, eta: float) -> None:
    vae, unet = model.first_stage_model.factor, model.model.diffusion_model.size_multiple
    for name, value in (("H", H), ("W", W)):
        if value < 1 or value % (vae * unet):
            raise ValueError(f"{name}={value}: the image size must be a positive multiple of {vae * unet} (the VAE "
                             f"factor {vae} times the UNet's {unet}: it halves the latent {unet.bit_length() - 1} times)")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}")
    if sampler == "plms" and eta != 0:
        raise ValueError(f"PLMS is deterministic: eta must be 0, got {eta}")


def txt2img(model: Any, prompts: Sequence[str], seeds: Sequence[int], H: int, W: int, steps: int = 50,
            scale: float = 7.5, eta: float = 0.0, negative_prompt: str = "",
            sampler: str = "ddim") -> np.ndarray:
    """One image per (prompt, seed) as uint8 (N, H, W, 3), steps 1-4 of the module notes.

    ``sampler``: "ddim" or "plms" (eta 0). Call inside ``sampling_mode`` (or ``torch.no_grad``).
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"txt2img: {len(prompts)} prompts but {len(seeds)} seeds")
    check_settings(model, H, W, sampler, eta)
    if eta > 0 and len(prompts) > 1:
        return np.concatenate([txt2img(model, [p], [s], H, W, steps, scale, eta, negative_prompt, sampler)
                               for p, s in zip(prompts, seeds)])
    factor = model.first_stage_model.factor
    shape = (model.channels, H // factor, W // factor)
    x_T = initial_noise(seeds, shape, model.device)  # (N, C, h, w)
    with weights_autocast(model):
        c = model.get_learned_conditioning(list(prompts))  # (N, 77, D)
        uc = model.get_learned_conditioning([negative_prompt] * len(prompts)) if scale != 1.0 else None
        generator = torch.Generator(model.device).manual_seed(int(seeds[0]))
        z, _ = SAMPLERS[sampler](model).sample(S=steps, batch_size=len(prompts), shape=shape, conditioning=c,
                                               unconditional_guidance_scale=scale, unconditional_conditioning=uc,
                                               eta=eta, x_T=x_T, generator=generator, verbose=False)
        return to_uint8(model.decode_first_stage(z))  # (N, H, W, 3)
