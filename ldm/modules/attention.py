"""Cross-attention transformer of the sd-v1 UNet (LDM, Rombach et al. 2022, sec. 3.3).

Module names follow CompVis `ldm/modules/attention.py`, so sd-v1 checkpoints load strictly.
"""
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ldm.modules.diffusionmodules.util import checkpoint, zero_module


class CrossAttention(nn.Module):
    """Multi-head attention softmax(Q K^T / sqrt(d)) V with Q from x and K, V from the context.

    Self-attention when no context is given (Vaswani et al. 2017, eq. 1). Inside
    ``reuse_context_kv`` the keys and values of a context are computed once per context tensor.
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: Optional[int] = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
    ):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))
        self.context_memo: Optional[list] = None  # [context, its version, K, V]; None: off

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        q = self.to_q(x)  # [B, N, h*d]
        k, v = (self.to_k(x), self.to_v(x)) if context is None else self.context_kv(context)  # [B, N|M, h*d]
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # [B, h, N, d]
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))  # [B, N, query_dim]

    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) of ``context`` [B, M, D]; remembered while the same, unmodified tensor comes again
        (only with the memo on and gradients off)."""
        memo = self.context_memo
        if memo is None or torch.is_grad_enabled():
            return self.to_k(context), self.to_v(context)
        if not memo or memo[0] is not context or memo[1] != context._version:
            memo[:] = [context, context._version, self.to_k(context), self.to_v(context)]
        return memo[2], memo[3]


@contextmanager
def reuse_context_kv(model: Any) -> Iterator[None]:
    """Within: each ``CrossAttention`` of ``model`` (an ``nn.Module``; anything else: no effect)
    projects a context to keys and values once and reuses them while the same tensor object comes
    back unmodified, with gradients off. For sampling loops, where the context is the same at every
    step and the weights do not change; the outputs are the same as without it."""
    layers = [m for m in model.modules() if isinstance(m, CrossAttention)] if isinstance(model, nn.Module) else []
    for layer in layers:
        layer.context_memo = []
    try:
        yield
    finally:
        for layer in layers:
            layer.context_memo = None


class GEGLU(nn.Module):
    """GELU-gated linear unit: a * GELU(b) with [a, b] = x W + c (Shazeer 2020, eq. 6)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)  # [..., dim_out] each
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """Position-wise feed-forward with a GEGLU input layer (`net.0.proj`, `net.2`)."""

    def __init__(self, dim: int, dim_out: Optional[int] = None, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner_dim = dim * mult
        dim_out = dim if dim_out is None else dim_out
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # [..., dim_out]


class BasicTransformerBlock(nn.Module):
    """Pre-LN block: x += SelfAttn(LN x); x += CrossAttn(LN x, context); x += FF(LN x)."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: Optional[int] = None,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.use_checkpoint = use_checkpoint

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        return checkpoint(self._forward, x, context, enabled=self.use_checkpoint)

    def _forward(self, x: torch.Tensor, context: Optional[torch.Tensor]) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))  # [B, N, dim]
        x = x + self.attn2(self.norm2(x), context)  # [B, N, dim]
        return x + self.ff(self.norm3(x))  # [B, N, dim]


class SpatialTransformer(nn.Module):
    """Transformer over the H*W positions of a feature map, conditioned by cross-attention.

    GroupNorm, 1x1-conv projection in, `depth` transformer blocks, zero-initialised 1x1-conv
    projection out, residual connection (LDM sec. 3.3; sd-v1 uses convolutional projections).
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: Optional[int] = None,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        inner_dim = n_heads * d_head
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6)
        self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout, context_dim, use_checkpoint)
            for _ in range(depth)
        )
        self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, kernel_size=1))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        height, width = x.shape[-2:]
        h = self.proj_in(self.norm(x))  # [B, inner, H, W]
        # dense tokens: otherwise the residual adds keep the permuted layout and every LayerNorm copies
        h = rearrange(h, "b c h w -> b (h w) c").contiguous()  # [B, H*W, inner]
        for block in self.transformer_blocks:
            h = block(h, context)  # [B, H*W, inner]
        h = rearrange(h, "b (h w) c -> b c h w", h=height, w=width)  # [B, inner, H, W]
        return x + self.proj_out(h)  # [B, C, H, W]
