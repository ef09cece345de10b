"""blip2.processors: pixel values equal transformers' BlipImageProcessor (PIL path) on real photos."""
from __future__ import annotations

import json

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from blip2.processors import CLIP_MEAN, CLIP_STD, Blip2ImageProcessor

# Measured: 0.0 (bit-identical) for every photo and size below.
TOLERANCE = 1e-6


def _photos() -> list[Image.Image]:
    arrays = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.camera()]
    alpha = np.tile((np.arange(600) % 256).astype(np.uint8)[None, :, None], (400, 1, 1))  # coffee is 400 x 600
    rgba = np.concatenate([skimage.data.coffee(), alpha], -1)
    return [Image.fromarray(a) for a in arrays] + [Image.fromarray(rgba, "RGBA")]


@pytest.mark.parametrize("size", [224, 364])
def test_pixels_equal_transformers_from_folder(tmp_path, size):
    ref = BlipImageProcessorPil(size={"height": size, "width": size}, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    ref.save_pretrained(tmp_path)
    ours = Blip2ImageProcessor.from_folder(tmp_path)
    assert ours.image_size == size
    photos = _photos()
    expected = ref(photos, return_tensors="pt")["pixel_values"]
    got = ours(photos)
    assert got.shape == (len(photos), 3, size, size) and got.dtype == torch.float32
    assert (got - expected).abs().max().item() <= TOLERANCE


def test_mean_std_and_resample_come_from_the_folder(tmp_path):
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    ref = BlipImageProcessorPil(size={"height": 32, "width": 32}, image_mean=mean, image_std=std, resample=2)
    ref.save_pretrained(tmp_path)
    ours = Blip2ImageProcessor.from_folder(tmp_path)
    photo = _photos()[:1]
    assert (ours(photo) - ref(photo, return_tensors="pt")["pixel_values"]).abs().max().item() <= TOLERANCE
    assert (ours(photo) - Blip2ImageProcessor(32)(photo)).abs().max().item() > 0.1


def _write(tmp_path, cfg) -> None:
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg) if isinstance(cfg, dict) else cfg)


@pytest.mark.parametrize("cfg, why", [
    ("{not json", "not valid JSON"),
    ({"size": {"height": 224, "width": 160}}, "'size'"),
    ({"size": {"shortest_edge": 224}}, "shortest-edge"),
    ({"size": 224, "image_mean": [0.5, 0.5]}, "3 means"),
    ({"size": 224, "image_std": [0.5, 0.0, 0.5]}, "positive stds"),
    ({"size": 224, "do_normalize": False}, "'do_normalize'"),
    ({"size": 224, "resample": 99}, "99"),
])
def test_malformed_config_is_one_line_naming_the_file(tmp_path, cfg, why):
    _write(tmp_path, cfg)
    with pytest.raises(ValueError) as info:
        Blip2ImageProcessor.from_folder(tmp_path)
    message = str(info.value)
    assert "preprocessor_config.json" in message and why in message and "\n" not in message


def test_missing_config_and_empty_batch(tmp_path):
    with pytest.raises(ValueError, match="preprocessor config not found"):
        Blip2ImageProcessor.from_folder(tmp_path)
    with pytest.raises(ValueError, match="at least one image"):
        Blip2ImageProcessor()([])
