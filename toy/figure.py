"""The toy evaluation's picture (README, "The toy world"): one row per model, its samples of
"a <identifier> <class>" and of "a <class>" side by side, under a first row of the subject's photos.

Images are enlarged by whole pixels (nearest neighbour), so what the figure shows is what the
captioner read; every row is labelled, and each block of columns is titled with its prompt.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from core.images import save_png

LABEL_WIDTH = 250  # pixels of the row-label column ("DreamBooth without prior preservation" is 234 at x = 4)
TITLE_HEIGHT = 18
GAP = 10  # between the two blocks of a row
PAD = 2


def _cell(image: Image.Image, zoom: int) -> Image.Image:
    return image.convert("RGB").resize((image.width * zoom, image.height * zoom), Image.Resampling.NEAREST)


def ablation_figure(rows: Mapping[str, Sequence[Sequence[Image.Image]]], photos: Sequence[Image.Image],
                    titles: Sequence[str], per_block: int = 8, zoom: int = 2) -> Image.Image:
    """``rows``: label -> one list of images per block (``titles[k]`` heads block k); the first
    ``per_block`` of each are drawn. The top row holds ``photos`` under the label "subject photos"."""
    if not rows or any(len(blocks) != len(titles) for blocks in rows.values()):
        raise ValueError(f"ablation_figure: expected {len(titles)} blocks of images in every row, "
                         f"got {[len(b) for b in rows.values()]}")
    side = photos[0].width * zoom + PAD
    block = per_block * side
    width = LABEL_WIDTH + len(titles) * (block + GAP)
    height = TITLE_HEIGHT + (len(rows) + 1) * side + PAD
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default(size=13)
    for k, title in enumerate(titles):
        draw.text((LABEL_WIDTH + k * (block + GAP), 3), title, fill=(0, 0, 0), font=font)
    for r, (label, blocks) in enumerate([("subject photos", [photos[:per_block]]), *rows.items()]):
        y = TITLE_HEIGHT + r * side
        draw.text((4, y + side // 2 - 6), label, fill=(0, 0, 0), font=font)
        for k, images in enumerate(blocks):
            for i, image in enumerate(images[:per_block]):
                canvas.paste(_cell(image, zoom), (LABEL_WIDTH + k * (block + GAP) + i * side, y))
    return canvas


def save_figure(figure: Image.Image, path: str | os.PathLike) -> Path:
    """Write the figure as a PNG (atomically, ``core.images.save_png``)."""
    return save_png(np.asarray(figure), path)
