"""Small helpers shared by the tests."""
from __future__ import annotations

import torch


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Fill every parameter with seeded noise, so zero-initialised layers cannot hide mistakes.

    Norm weights are kept near one so activations stay in a sane range.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(module.named_parameters()):
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * scale
        if p.ndim == 1 and ("norm" in name.lower() or "ln" in name) and name.endswith("weight"):
            noise = noise + 1.0
        p.copy_(noise.to(p.dtype))
    return module


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|: the relative error the parity tests bound."""
    ours, ref = ours.detach().double(), ref.detach().double()
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
