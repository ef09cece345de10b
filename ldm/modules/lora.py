"""Low-rank adapters (LoRA, Hu et al. 2021, arXiv 2106.09685) for the sd-v1 UNet and CLIP text encoder.

Notation: W (out, in) and b the frozen base layer, r the rank, alpha the scale numerator,
down (r, in) and up (out, r) the adapter:

    y = W x + b + (alpha / r) * up(dropout(down(x)))

``down`` starts kaiming-uniform (a = sqrt(5), nn.Linear's default, as kohya and peft) and ``up`` at
zero, so an adapted model starts equal to its base. An adapted layer is still the ``nn.Linear`` /
``nn.Conv2d`` (a subclass holding the base's own parameters), so the base keys stay the sd-v1 keys
(``...attn1.to_q.weight``); the adapter adds ``...attn1.to_q.lora_down.weight`` and ``lora_up.weight``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import torch
from torch import nn

# module-name suffixes (CompVis names): the UNet's attention projections, the default targets
UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
UNET_FEED_FORWARD = ("ff.net.0.proj", "ff.net.2")
UNET_PROJECTIONS = ("proj_in", "proj_out")  # SpatialTransformer, 1x1 convolutions
UNET_RESBLOCK = ("emb_layers.1", "skip_connection")  # time-embedding projection, 1x1 shortcut
TEXT_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")  # CLIPAttention


def check_lora_args(rank: int, alpha: float, dropout: float, where: str = "LoRA") -> None:
    """One line naming the bad key: rank a positive integer, alpha > 0, dropout in [0, 1)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"{where}.rank must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"{where}.alpha must be a number > 0, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"{where}.dropout must be in [0, 1), got {dropout!r}")


class LoRALayer:
    """The adapter half shared by LoRALinear and LoRAConv2d (``lora_down``, ``lora_up``, ``scale``)."""

    lora_down: nn.Module
    lora_up: nn.Module

    def add_adapter(self, down: nn.Module, up: nn.Module, rank: int, alpha: float, dropout: float) -> None:
        check_lora_args(rank, alpha, dropout)
        self.rank, self.alpha, self.scale = rank, float(alpha), alpha / rank
        self.lora_down, self.lora_up, self.lora_dropout = down, up, nn.Dropout(dropout)
        nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        nn.init.zeros_(up.weight)

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        """(alpha / r) * up(dropout(down(x)))."""
        return self.scale * self.lora_up(self.lora_dropout(self.lora_down(x)))

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) * up @ down in the base weight's shape (the merge W + delta)."""
        up, down = self.lora_up.weight.flatten(1), self.lora_down.weight.flatten(1)  # (out, r), (r, in)
        return (self.scale * up @ down).view(self.weight.shape)


class LoRALinear(nn.Linear, LoRALayer):
    """``base`` (its own weight and bias, frozen) plus an adapter."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.add_adapter(nn.Linear(base.in_features, rank, bias=False, **kw),
                         nn.Linear(rank, base.out_features, bias=False, **kw), rank, alpha, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.lora_delta(x)  # [..., out]


class LoRAConv2d(nn.Conv2d, LoRALayer):
    """A 1x1 convolution ``base`` (frozen) plus an adapter of two 1x1 convolutions."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(base.in_channels, base.out_channels, 1, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.add_adapter(nn.Conv2d(base.in_channels, rank, 1, bias=False, **kw),
                         nn.Conv2d(rank, base.out_channels, 1, bias=False, **kw), rank, alpha, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.lora_delta(x)  # [B, out, H, W]


def is_pointwise_conv(module: nn.Module) -> bool:
    return (type(module) is nn.Conv2d and module.kernel_size == (1, 1) and module.stride == (1, 1)
            and module.padding == (0, 0) and module.groups == 1 and module.dilation == (1, 1))


def adapted(module: nn.Module, name: str, rank: int, alpha: float, dropout: float) -> nn.Module:
    """``module`` with an adapter; only plain Linear and 1x1 Conv2d layers can take one."""
    if type(module) is nn.Linear:
        return LoRALinear(module, rank, alpha, dropout)
    if is_pointwise_conv(module):
        return LoRAConv2d(module, rank, alpha, dropout)
    raise ValueError(f"LoRA target {name!r} is a {type(module).__name__}: only nn.Linear and 1x1 nn.Conv2d "
                     "layers take an adapter")


def matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def inject_lora(network: nn.Module, targets: Sequence[str], rank: int, alpha: float,
                dropout: float = 0.0) -> list[str]:
    """Freeze ``network`` and put a trainable adapter on every layer whose name ends in a target
    (``to_q`` matches ``...attn1.to_q``; identity layers are left out); returns the adapted names.
    Every target must match some layer."""
    check_lora_args(rank, alpha, dropout)
    if isinstance(targets, str) or not targets:
        raise ValueError(f"LoRA targets must be a non-empty list of module names, got {targets!r}")
    network.requires_grad_(False)
    names = [n for n, m in network.named_modules()
             if n and matches(n, targets) and not isinstance(m, nn.Identity)]  # e.g. an identity shortcut
    unmatched = [t for t in targets if not any(matches(n, [t]) for n in names)]
    if unmatched:
        raise ValueError(f"LoRA target {unmatched[0]!r} matches no module of the {type(network).__name__}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = network.get_submodule(parent_name)
        setattr(parent, child, adapted(getattr(parent, child), name, rank, alpha, dropout))
    return names


def lora_layers(network: nn.Module) -> dict[str, LoRALayer]:
    """Name -> adapted layer, in module order."""
    return {n: m for n, m in network.named_modules() if isinstance(m, LoRALayer)}


def lora_parameters(network: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters (down, up), the only trainable ones of an adapted network."""
    return [p for m in lora_layers(network).values() for p in (m.lora_down.weight, m.lora_up.weight)]


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """A system's ``lora:`` settings. ``alpha`` None: ``rank`` (scale 1); ``text_encoder``: adapters on
    the CLIP text encoder's attention projections too."""

    rank: int = 4
    alpha: float | None = None
    dropout: float = 0.0
    unet_targets: tuple[str, ...] = UNET_ATTENTION
    text_encoder: bool = False

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any], where: str) -> "LoRAConfig":
        """Build from a config mapping; an unknown or bad value is one line naming ``where.key``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"{where}.{unknown[0]} is not a LoRA setting (known: {', '.join(sorted(known))})")
        config = cls(**{**settings, "unet_targets": tuple(settings.get("unet_targets", UNET_ATTENTION))})
        check_lora_args(config.rank, config.scale_alpha, config.dropout, where)
        if not isinstance(config.text_encoder, bool):
            raise ValueError(f"{where}.text_encoder must be true or false, got {config.text_encoder!r}")
        return config

    @property
    def scale_alpha(self) -> float:
        return self.rank if self.alpha is None else self.alpha

    def inject(self, network: nn.Module, targets: Sequence[str]) -> list[str]:
        return inject_lora(network, targets, self.rank, self.scale_alpha, self.dropout)
