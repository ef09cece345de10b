"""Pieces shared by the inference scripts: building a model from a config and a checkpoint,
turning decoded samples into images, grids and PNG files that carry their settings."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from einops import rearrange
from omegaconf import OmegaConf
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ldm.checkpoint import CheckpointError, atomic_path
from ldm.models.autoencoder import downsampling_factor
from ldm.util import instantiate_from_config


def load_config(paths: Sequence[str | os.PathLike]) -> Any:
    """Merge YAML files in order (later ones override earlier ones)."""
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"{p}: config file not found")
    return OmegaConf.merge(*[OmegaConf.load(p) for p in paths])


def load_model(config: Any, ckpt: str | os.PathLike | None, device: torch.device | str = "cpu") -> Any:
    """Build ``config.model`` and load ``ckpt`` strictly (a missing or ill-fitting file is a
    ``CheckpointError`` naming it and the keys). ``ckpt`` None keeps the random weights."""
    if "model" not in config:
        raise KeyError("config has no 'model' section")
    if ckpt is not None and not Path(ckpt).is_file():
        raise CheckpointError(f"{ckpt}: checkpoint file not found")
    model = instantiate_from_config(config.model)
    if ckpt is not None:
        model.init_from_ckpt(str(ckpt))
    return model.to(device).eval()


def latent_factor(config: Any) -> int:
    """Down-sampling factor of the config's first stage (8 for sd-v1), known before building it."""
    return downsampling_factor(config.model.params.first_stage_config.params.ddconfig)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Decoded samples in [-1, 1], (B, 3, H, W) -> uint8 (B, H, W, 3)."""
    x = ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)
    return (rearrange(x, "b c h w -> b h w c").cpu().numpy() * 255.0).round().astype(np.uint8)


def make_grid(images: np.ndarray, nrow: int, pad: int = 2) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one image with ``nrow`` images per row, white padding between."""
    n, h, w, c = images.shape
    rows = -(-n // nrow)
    canvas = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        canvas[y:y + h, x:x + w] = img
    return canvas


def save_png(image: np.ndarray, path: str | os.PathLike, info: Mapping[str, Any] | None = None) -> Path:
    """Write a PNG atomically; ``info`` goes into its text chunks (one per key, plus ``parameters`` as JSON)."""
    meta = PngInfo()
    for k, v in (info or {}).items():
        meta.add_text(str(k), str(v))
    if info:
        meta.add_text("parameters", json.dumps(dict(info), default=str))
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG", pnginfo=meta)
    return path


def next_index(folder: str | os.PathLike, pattern: str = "*.png") -> int:
    """The first free index in a folder of numbered outputs (CompVis ``base_count``)."""
    return len(list(Path(folder).glob(pattern)))
