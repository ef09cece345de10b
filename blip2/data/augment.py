"""BLIP-2's training image augmentation (LAVIS ``blip2_image_train``), without torchvision.

1. Random resized crop: a box of area fraction ~ U(scale) and aspect ratio ~ logU(3/4, 4/3) at a
   uniform position (up to 10 tries; then the centred box of the whole image clamped to that ratio
   range), resized to s x s bicubically (torchvision's ``RandomResizedCrop`` draws, on PIL images).
2. Horizontal flip with probability 1/2.
3. The eval processor's arithmetic: rescale by 1/255 and normalise with the CLIP mean and std
   (``blip2.processors.Blip2ImageProcessor``; its resize is a no-op at s x s).
Draws come from the torch generator given (the global one by default: DataLoader seeds each worker).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from PIL import Image

from blip2.processors import CLIP_MEAN, CLIP_STD, Blip2ImageProcessor

RATIO = (3 / 4, 4 / 3)


def _uniform(low: float, high: float, gen: torch.Generator | None) -> float:
    return low + (high - low) * torch.rand((), generator=gen).item()


def _randint(high: int, gen: torch.Generator | None) -> int:
    """A uniform integer in [0, high]."""
    return int(torch.randint(0, high + 1, (), generator=gen))


def crop_box(width: int, height: int, scale: Sequence[float], gen: torch.Generator | None = None,
             ratio: Sequence[float] = RATIO) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a random resized crop of a ``width x height`` image."""
    area = width * height
    for _ in range(10):
        target = area * _uniform(scale[0], scale[1], gen)
        aspect = math.exp(_uniform(math.log(ratio[0]), math.log(ratio[1]), gen))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return _randint(width - w, gen), _randint(height - h, gen), w, h
    if width / height < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif width / height > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class TrainTransform:
    """RGB PIL image -> augmented, normalised [3, s, s] float32 tensor."""

    def __init__(self, image_size: int = 224, min_scale: float = 0.5, max_scale: float = 1.0, flip_p: float = 0.5,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
        if not 0 < min_scale <= max_scale <= 1:
            raise ValueError(f"crop scale ({min_scale}, {max_scale}): expected 0 < min_scale <= max_scale <= 1")
        self.image_size, self.scale, self.flip_p = image_size, (min_scale, max_scale), flip_p
        self.normalize = Blip2ImageProcessor(image_size, mean, std)

    def __call__(self, image: Image.Image, gen: torch.Generator | None = None) -> torch.Tensor:
        left, top, w, h = crop_box(image.width, image.height, self.scale, gen)
        s = self.image_size
        image = image.crop((left, top, left + w, top + h)).resize((s, s), Image.Resampling.BICUBIC)
        if torch.rand((), generator=gen).item() < self.flip_p:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return self.normalize([image])[0]  # (3, s, s)


class EvalTransform:
    """RGB PIL image -> bicubically resized, normalised [3, s, s] tensor (LAVIS ``blip_image_eval``)."""

    def __init__(self, image_size: int = 224, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
        self.processor = Blip2ImageProcessor(image_size, mean, std)

    def __call__(self, image: Image.Image, gen: torch.Generator | None = None) -> torch.Tensor:
        return self.processor([image])[0]  # (3, s, s)
