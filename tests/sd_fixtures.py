"""Tiny sd-v1 shaped models and files for the tests."""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from core.config import instantiate_from_config
from tests._util import randomize_

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "toy" / "tiny-sd.yaml"
FULL_CONFIG = ROOT / "configs" / "v1-inference.yaml"


def tiny_config(**overrides):
    cfg = OmegaConf.load(TINY_CONFIG)
    for k, v in overrides.items():
        OmegaConf.update(cfg, k, v)
    return cfg


def tiny_model(seed: int = 0, **overrides):
    """The tiny LatentDiffusion with every parameter randomised (so no zero-init layer hides a bug)."""
    model = instantiate_from_config(tiny_config(**overrides).model)
    randomize_(model, seed=seed, scale=0.1)
    if model.use_ema:
        model.model_ema.reset_from(model.model)
    return model.eval()


def plain(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)
