"""Small pieces shared by the diffusion UNet (names as in CompVis `diffusionmodules/util.py`)."""
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint


def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal timestep embedding (Vaswani et al. 2017, sec. 3.5; DDPM, Ho et al. 2020).

    emb(t) = [cos(t w_0), ..., cos(t w_{h-1}), sin(t w_0), ..., sin(t w_{h-1})],
    w_i = max_period^(-i / h), h = dim // 2; one zero column is appended when dim is odd.
    Returns float32 [B, dim] for timesteps t [B] (int or float).
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=t.device) / half
    freqs = torch.exp(-math.log(max_period) * exponent)  # [h]
    args = t.float()[:, None] * freqs[None]  # [B, h]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, 2h]
    return F.pad(emb, (0, dim % 2))  # [B, dim]


class GroupNorm32(nn.GroupNorm):
    """GroupNorm (Wu & He 2018) computed in float32 and returned in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        out = F.group_norm(x.float(), self.num_groups, weight, bias, self.eps)  # [B, C, ...] fp32
        return out.to(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    """The UNet's standard norm layer: 32 groups, eps 1e-5, affine."""
    return GroupNorm32(32, channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of `module` (residual branches start as the identity) and return it."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def checkpoint(fn: Callable[..., Any], *args: Any, enabled: bool) -> Any:
    """`fn(*args)`, with gradient checkpointing (Chen et al. 2016) when enabled and grads are on.

    Activations inside `fn` are dropped after the forward pass and recomputed in the backward pass;
    the RNG state is restored for the recomputation, so dropout masks match.
    """
    if enabled and torch.is_grad_enabled():
        return torch_checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)
