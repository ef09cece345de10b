"""EVA ViT-g/14, the frozen image encoder of BLIP-2 (Li et al. 2023, arXiv 2301.12597, Sec. 3.1;
Fang et al., EVA, arXiv 2211.07636).

A pre-LN ViT with a CLS token and learned absolute positions. Attention has a fused ``qkv``
projection whose bias is stored fused as ``[b_q, b_k, b_v]`` (EVA trains only ``b_q`` and ``b_v``;
the released weights hold ``b_k = 0``). Module names follow transformers' ``Blip2VisionModel``,
so the Hub weights load by name. The last EVA block is dropped upstream (39 of 40 blocks), and
``post_layernorm`` is BLIP-2's ``ln_vision``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from blip2.config import activation


class VisionEmbeddings(nn.Module):
    """Patchify, prepend the CLS token, add positions (bicubically resized for other image sizes)."""

    def __init__(self, image_size: int = 224, patch_size: int = 14, width: int = 1408):
        super().__init__()
        self.patch_size = patch_size
        self.grid = image_size // patch_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, width))
        self.patch_embedding = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, self.grid**2 + 1, width))

    def positions(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Position table for a ``grid_h x grid_w`` patch grid: [1, 1 + grid_h * grid_w, D]."""
        if (grid_h, grid_w) == (self.grid, self.grid):
            return self.position_embedding
        cls_pos, patch_pos = self.position_embedding[:, :1], self.position_embedding[:, 1:]
        patch_pos = rearrange(patch_pos, "1 (h w) d -> 1 d h w", h=self.grid)
        patch_pos = F.interpolate(patch_pos, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        return torch.cat([cls_pos, rearrange(patch_pos, "1 d h w -> 1 (h w) d")], dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.patch_embedding.weight.dtype
        x = self.patch_embedding(pixel_values.to(dtype))  # (B, D, H/p, W/p)
        grid_h, grid_w = x.shape[-2:]
        x = rearrange(x, "b d h w -> b (h w) d")  # (B, N, D)
        cls = self.class_embedding.to(dtype).expand(x.shape[0], -1, -1)  # (B, 1, D)
        return torch.cat([cls, x], dim=1) + self.positions(grid_h, grid_w).to(dtype)  # (B, 1+N, D)


class EvaAttention(nn.Module):
    """Multi-head self-attention with the fused ``qkv`` projection and an output ``projection``."""

    def __init__(self, width: int = 1408, heads: int = 16, qkv_bias: bool = True):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
        self.projection = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, d)
        return self.projection(rearrange(out, "b h n d -> b n (h d)"))  # (B, N, D)


class EvaMLP(nn.Module):
    """Two-layer MLP with exact GELU."""

    def __init__(self, width: int = 1408, mlp_dim: int = 6144, act: str = "gelu"):
        super().__init__()
        self.act = activation(act)
        self.fc1 = nn.Linear(width, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EvaBlock(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, width: int = 1408, heads: int = 16, mlp_dim: int = 6144, eps: float = 1e-6,
                 act: str = "gelu", qkv_bias: bool = True):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.self_attn = EvaAttention(width, heads, qkv_bias)
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = EvaMLP(width, mlp_dim, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))  # (B, N, D)
        return x + self.mlp(self.layer_norm2(x))  # (B, N, D)


class EvaViT(nn.Module):
    """Image encoder: pixels [B, 3, H, W] -> ``ln_vision`` features [B, 1 + (H/p)(W/p), D]."""

    def __init__(self, image_size: int = 224, patch_size: int = 14, width: int = 1408, depth: int = 39,
                 heads: int = 16, mlp_dim: int = 6144, eps: float = 1e-6, act: str = "gelu",
                 qkv_bias: bool = True):
        super().__init__()
        self.embeddings = VisionEmbeddings(image_size, patch_size, width)
        blocks = [EvaBlock(width, heads, mlp_dim, eps, act, qkv_bias) for _ in range(depth)]
        self.encoder = nn.ModuleDict({"layers": nn.ModuleList(blocks)})
        self.post_layernorm = nn.LayerNorm(width, eps=eps)
        self.gradient_checkpointing = False  # training: recompute each block's activations in backward

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixel_values)  # (B, 1+N, D)
        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        for block in self.encoder.layers:
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)  # (B, 1+N, D)
        return self.post_layernorm(x)  # (B, 1+N, D)
