"""BLIP-2 image preprocessing: RGB -> bicubic resize to s x s -> rescale -> normalise.

The same arithmetic as transformers' ``BlipImageProcessor`` (its PIL path), which the released
BLIP-2 weights were evaluated with: PIL resize of the 8-bit image, ``x * 1/255`` in float64 cast
to float32, then ``(x - mean) / std`` in float32 with the CLIP mean and std.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from einops import rearrange
from PIL import Image

from core.images import to_rgb

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_FILE = "preprocessor_config.json"


class Blip2ImageProcessor:
    """PIL images -> ``pixel_values`` (B, 3, s, s) float32 for the EVA ViT (BLIP-2, arXiv 2301.12597)."""

    def __init__(
        self,
        image_size: int = 224,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        resample: int = Image.Resampling.BICUBIC,
        rescale_factor: float = 1 / 255,
    ) -> None:
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"expected 3 means and 3 positive stds, got mean={list(mean)} std={list(std)}")
        self.image_size = int(image_size)
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.resample = Image.Resampling(resample)
        self.rescale_factor = float(rescale_factor)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "Blip2ImageProcessor":
        """Read a Hub folder's ``preprocessor_config.json``; a malformed one is a one-line error."""
        path = Path(folder) / PREPROCESSOR_FILE
        if not path.is_file():
            raise ValueError(f"{path}: preprocessor config not found")
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        try:
            return cls(**processor_args(cfg))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from None

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """A list of PIL images (any mode, any size) -> float32 ``pixel_values`` (B, 3, s, s)."""
        if not images:
            raise ValueError("expected at least one image")
        batch = np.stack([self._one(image) for image in images])  # (B, s, s, 3)
        return rearrange(torch.from_numpy(batch), "b h w c -> b c h w").contiguous()

    def _one(self, image: Image.Image) -> np.ndarray:
        s = self.image_size
        resized = to_rgb(image).resize((s, s), resample=self.resample)  # (s, s) 8-bit RGB
        x = (np.asarray(resized, dtype=np.float64) * self.rescale_factor).astype(np.float32)
        return (x - self.mean) / self.std  # (s, s, 3)


def _size(size: Any) -> int:
    if isinstance(size, int):
        return size
    if isinstance(size, Mapping) and set(size) == {"height", "width"} and size["height"] == size["width"]:
        return int(size["height"])
    if isinstance(size, Mapping) and set(size) == {"shortest_edge"}:
        raise ValueError(f"'size' {dict(size)}: shortest-edge resizing is not BLIP-2's, expected height == width")
    raise ValueError(f"'size': expected an int or {{'height': s, 'width': s}}, got {size!r}")


def processor_args(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor arguments from a transformers ``BlipImageProcessor`` config dict."""
    for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
        if cfg.get(flag, True) is not True:
            raise ValueError(f"'{flag}': only true is supported (BLIP-2 always does it), got {cfg[flag]!r}")
    return dict(
        image_size=_size(cfg.get("size", 224)),
        mean=[float(m) for m in cfg.get("image_mean", CLIP_MEAN)],
        std=[float(s) for s in cfg.get("image_std", CLIP_STD)],
        resample=int(cfg.get("resample", Image.Resampling.BICUBIC)),
        rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
    )
