"""BLIP-2's layer-wise learning-rate decay of the ViT (LAVIS ``Blip2Base.get_optimizer_params``),
the one BLIP-2-specific piece of its optimiser; groups and AdamW come from ``core.optim``.

With L ViT blocks and decay d, the patch and position embeddings get d^(L+1), block i gets
d^(L-i), so the last block gets d. ``ln_vision`` (our ``vision_model.post_layernorm``) lies outside
LAVIS's ViT and keeps scale 1, as does everything outside the ViT. (LAVIS's schedulers then
overwrite every group's lr, so its scales never act; here they do, and d = 1, the configs' value,
gives plain AdamW.)
"""
from __future__ import annotations

from typing import Callable

from torch import nn

VISION_PREFIX = "vision_model."


def vit_lr_scale(name: str, depth: int, decay: float) -> float:
    """Learning-rate scale of the ViT parameter ``name`` (relative to ``vision_model``)."""
    if name.startswith("embeddings."):
        return decay ** (depth + 1)
    if name.startswith("encoder.layers."):
        return decay ** (depth - int(name.split(".")[2]))
    return 1.0


def vit_layer_lr_scale(model: nn.Module, decay: float) -> Callable[[str], float]:
    """``lr_scale(name)`` for ``core.optim.param_groups`` over ``model.named_parameters()`` (a
    ``Blip2OPT``): ``vit_lr_scale`` inside ``vision_model``, 1 elsewhere."""
    depth = len(model.vision_model.encoder.layers)

    def lr_scale(name: str) -> float:
        if not name.startswith(VISION_PREFIX):
            return 1.0
        return vit_lr_scale(name.removeprefix(VISION_PREFIX), depth, decay)

    return lr_scale
