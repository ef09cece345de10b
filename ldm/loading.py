"""The one loader of the latent-diffusion family: a config plus a weight file (a released sd-v1
``.ckpt`` / ``.safetensors``, an export, or a Lightning checkpoint of ours) -> a model, strictly."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from core.config import instantiate_from_config
from core.weights import CheckpointError
from ldm.models.autoencoder import downsampling_factor
from ldm.modules.diffusionmodules.openaimodel import CHANNEL_MULT, size_multiple


def load_model(config: Any, ckpt: str | os.PathLike | None, device: torch.device | str = "cpu",
               base: str | os.PathLike | None = None) -> Any:
    """Build ``config.model`` and load ``ckpt`` strictly (a missing or ill-fitting file is a
    ``CheckpointError`` naming it and the keys). ``ckpt`` None keeps the random weights; ``base``:
    where a lean checkpoint's base file is now, when it was moved (``core.lean``)."""
    if "model" not in config:
        raise KeyError("config has no 'model' section")
    if ckpt is not None and not Path(ckpt).is_file():
        raise CheckpointError(f"{ckpt}: checkpoint file not found")
    if base is not None and ckpt is None:
        raise ValueError(f"--base_weights {base}: given without a checkpoint to complete")
    model = instantiate_from_config(config.model)
    if ckpt is not None:
        model.init_from_ckpt(str(ckpt), base=None if base is None else str(base))
    return model.to(device).eval()


def latent_factor(config: Any) -> int:
    """Down-sampling factor of the config's first stage (8 for sd-v1), known before building it."""
    return downsampling_factor(config.model.params.first_stage_config.params.ddconfig)


def pixel_multiple(config: Any) -> int:
    """What an image side must be a multiple of (64 for sd-v1): the VAE factor times the UNet's
    halvings of the latent, known before building the model."""
    unet = config.model.params.unet_config.params
    return latent_factor(config) * size_multiple(unet.get("channel_mult", CHANNEL_MULT))
