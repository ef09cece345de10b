"""Exponential moving average of a module's parameters, stored as buffers (CompVis ``LitEma``).

Checkpoint layout (sd-v1 ``model_ema.*``): one buffer per parameter, named after the parameter with
its dots removed, plus ``decay`` and ``num_updates``.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


def _flat(name: str) -> str:
    return name.replace(".", "")


class LitEma(nn.Module):
    """EMA ``shadow <- shadow - (1 - d) * (shadow - param)`` with the warm-up
    ``d = min(decay, (1 + n) / (10 + n))`` when ``use_num_updates``."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, use_num_updates: bool = True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0 if use_num_updates else -1, dtype=torch.int))
        self.names = {}  # parameter name -> buffer name
        for name, p in model.named_parameters():
            if p.requires_grad:
                self.names[name] = _flat(name)
                self.register_buffer(self.names[name], p.detach().clone().float())

    def current_decay(self) -> float:
        decay = self.decay.item()
        if self.num_updates.item() >= 0:
            n = self.num_updates.item()
            decay = min(decay, (1 + n) / (10 + n))
        return decay

    @torch.no_grad()
    def forward(self, model: nn.Module) -> None:
        """One EMA update from ``model``'s current parameters."""
        if self.num_updates.item() >= 0:
            self.num_updates += 1
        one_minus = 1.0 - self.current_decay()
        shadow = dict(self.named_buffers())
        for name, p in model.named_parameters():
            if name in self.names:
                s = shadow[self.names[name]]
                s.sub_(one_minus * (s - p.detach().to(s.dtype)))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        shadow = dict(self.named_buffers())
        for name, p in model.named_parameters():
            if name in self.names:
                p.copy_(shadow[self.names[name]].to(p.dtype))

    @torch.no_grad()
    def reset_from(self, model: nn.Module) -> None:
        """Make the shadow equal to ``model``'s weights (an EMA-less checkpoint was loaded)."""
        shadow = dict(self.named_buffers())
        for name, p in model.named_parameters():
            if name in self.names:
                shadow[self.names[name]].copy_(p.detach())

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[None]:
        """Temporarily load the EMA weights into ``model``; the trained weights come back after."""
        saved = [p.detach().clone() for p in model.parameters()]
        self.copy_to(model)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(model.parameters(), saved):
                    p.copy_(s)
