"""Optimiser parameter groups and the learning-rate schedule of BLIP-2 training (LAVIS).

Groups (LAVIS ``Blip2Base.get_optimizer_params``): trainable parameters only; no weight decay on
biases and 1-d tensors (norms); ViT parameters scaled by layer-wise decay d: with L blocks the patch
and position embeddings get d^(L+1), block i gets d^(L-i), so the last block gets d. ``ln_vision``
(our ``vision_model.post_layernorm``) lies outside LAVIS's ViT and keeps scale 1. (LAVIS's
schedulers then overwrite every group's lr, so its scales never act; here they do, and d = 1, the
configs' value, gives plain AdamW.)

Schedule (LAVIS ``linear_warmup_cosine_lr``), set before each step: during epoch 0,
lr = min(lr_max, warmup_lr + (lr_max - warmup_lr) * step / warmup_steps); from epoch e >= 1,
lr = min_lr + (lr_max - min_lr) * (1 + cos(pi * e / max_epochs)) / 2, constant within the epoch.
"""
from __future__ import annotations

import math
from typing import Any

from torch import nn


def vit_lr_scale(name: str, depth: int, decay: float) -> float:
    """Learning-rate scale of the ViT parameter ``name`` (relative to ``vision_model``)."""
    if name.startswith("embeddings."):
        return decay ** (depth + 1)
    if name.startswith("encoder.layers."):
        return decay ** (depth - int(name.split(".")[2]))
    return 1.0


def param_groups(model: nn.Module, weight_decay: float, vit_layer_decay: float = 1.0) -> list[dict[str, Any]]:
    """AdamW groups of ``model`` (a ``Blip2OPT``): ``params``, ``weight_decay``, ``lr_scale``, ``name``."""
    depth = len(model.vision_model.encoder.layers)
    groups: dict[tuple[float, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim < 2 or name.endswith(".bias")
        scale = (vit_lr_scale(name.removeprefix("vision_model."), depth, vit_layer_decay)
                 if name.startswith("vision_model.") else 1.0)
        group = groups.setdefault((scale, no_decay), {
            "params": [], "weight_decay": 0.0 if no_decay else weight_decay, "lr_scale": scale,
            "name": f"lr_x{scale:.4g}_{'no_decay' if no_decay else 'decay'}"})
        group["params"].append(param)
    if not groups:
        raise ValueError("no trainable parameters: every part is frozen (freeze_vit, freeze_qformer, freeze_llm)")
    return list(groups.values())
