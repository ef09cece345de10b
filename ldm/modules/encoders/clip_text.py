"""CLIP text transformer (Radford et al. 2021, arXiv 2103.00020, Sec. 2.4) in the HF key layout.

A causal pre-LN transformer over byte-level BPE tokens: token plus learned absolute position
embeddings, ``layers`` blocks ``x + attn(ln1(x))`` and ``x + mlp(ln2(x))``, and a final layer
norm. Module names follow ``transformers``' ``CLIPTextModel``, so the sd-v1 keys
``cond_stage_model.transformer.text_model.*`` load strictly. Stable Diffusion v1 conditions on
the final-layer-norm hidden states of every position (Rombach et al. 2022, arXiv 2112.10752).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ldm.modules.diffusionmodules.util import checkpoint


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU: ``x * sigmoid(1.702 x)``."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": quick_gelu,
    "gelu": F.gelu,
}


def _consume_position_ids(module: "CLIPTextEmbeddings", state_dict: dict, prefix: str, *_) -> None:
    """Accept the ``position_ids`` buffer that released sd-v1 ``.ckpt`` files carry, never need it.

    Older ``transformers`` saved ``embeddings.position_ids`` (int64 ``[1, 77]``, always
    ``arange``); newer files drop it. Positions here are always ``arange(T)``, so the key is
    checked and removed before strict matching.
    """
    key = prefix + "position_ids"
    if key not in state_dict:
        return
    ids = state_dict.pop(key)
    n = module.position_embedding.num_embeddings
    if ids.numel() != n or (not ids.is_meta and not _is_arange(ids)):
        raise ValueError(f"{key}: expected arange({n}) of shape [1, {n}], got shape {list(ids.shape)}")


def _is_arange(ids: torch.Tensor) -> bool:
    """True when ``ids`` (int, or float as in some re-saved files) rounds to ``0, 1, ..., n-1``."""
    flat = ids.detach().reshape(-1).double().round()
    return torch.equal(flat, torch.arange(flat.numel(), dtype=flat.dtype, device=flat.device))


class CLIPTextEmbeddings(nn.Module):
    """Token embedding plus learned absolute position embedding."""

    def __init__(self, vocab_size: int = 49408, width: int = 768, max_positions: int = 77):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Embedding(max_positions, width)
        self.register_load_state_dict_pre_hook(_consume_position_ids)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        n_tok, n_pos = input_ids.shape[1], self.position_embedding.num_embeddings
        if n_tok > n_pos:
            raise ValueError(f"input_ids has {n_tok} tokens, the text model has {n_pos} positions")
        return self.token_embedding(input_ids) + self.position_embedding.weight[:n_tok]  # [B, T, W]


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention, ``softmax(q k^T / sqrt(d) + mask) v``."""

    def __init__(self, width: int = 768, heads: int = 12):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (
            rearrange(proj(x), "b t (h d) -> b h t d", h=self.heads)  # [B, H, T, D]
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, D]
        return self.out_proj(rearrange(out, "b h t d -> b t (h d)"))  # [B, T, W]


class CLIPMLP(nn.Module):
    """Position-wise feed-forward ``fc2(act(fc1(x)))``."""

    def __init__(self, width: int = 768, hidden: int = 3072, act: str = "quick_gelu"):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"act {act!r} is not one of {sorted(ACTIVATIONS)}")
        self.act = ACTIVATIONS[act]
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # [B, T, W]


class CLIPEncoderLayer(nn.Module):
    """Pre-LN residual block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``."""

    def __init__(self, width: int = 768, heads: int = 12, mlp_ratio: int = 4,
                 act: str = "quick_gelu", eps: float = 1e-5):
        super().__init__()
        self.self_attn = CLIPAttention(width, heads)
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.mlp = CLIPMLP(width, width * mlp_ratio, act)
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))  # [B, T, W]
        return x + self.mlp(self.layer_norm2(x))  # [B, T, W]


class CLIPEncoder(nn.Module):
    """A stack of ``layers`` encoder blocks."""

    def __init__(self, width: int = 768, layers: int = 12, heads: int = 12, mlp_ratio: int = 4,
                 act: str = "quick_gelu", eps: float = 1e-5):
        super().__init__()
        self.layers = nn.ModuleList(
            CLIPEncoderLayer(width, heads, mlp_ratio, act, eps) for _ in range(layers)
        )
        self.gradient_checkpointing = False  # per layer, when training the text encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = checkpoint(layer, x, enabled=self.gradient_checkpointing)  # [B, T, W]
        return x


class CLIPTextTransformer(nn.Module):
    """CLIP text transformer; returns the final-layer-norm hidden states ``[B, T, width]``.

    Defaults are the ViT-L/14 text tower used by Stable Diffusion v1.
    """

    def __init__(self, vocab_size: int = 49408, width: int = 768, layers: int = 12,
                 heads: int = 12, max_positions: int = 77, mlp_ratio: int = 4,
                 act: str = "quick_gelu", eps: float = 1e-5):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(vocab_size, width, max_positions)
        self.encoder = CLIPEncoder(width, layers, heads, mlp_ratio, act, eps)
        self.final_layer_norm = nn.LayerNorm(width, eps=eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(input_ids)  # [B, T, W]
        return self.final_layer_norm(self.encoder(x))  # [B, T, W]


class CLIPTextModel(nn.Module):
    """Holds the transformer as ``text_model``, giving the ``text_model.*`` keys of HF's class."""

    def __init__(self, vocab_size: int = 49408, width: int = 768, layers: int = 12,
                 heads: int = 12, max_positions: int = 77, mlp_ratio: int = 4,
                 act: str = "quick_gelu", eps: float = 1e-5):
        super().__init__()
        self.text_model = CLIPTextTransformer(
            vocab_size, width, layers, heads, max_positions, mlp_ratio, act, eps
        )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_model(input_ids)  # [B, T, W]


def pool_eos(hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """CLIP's sentence feature: the hidden state at the first eos, the largest id (49407)."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, input_ids.to(hidden.device).argmax(dim=-1)]  # [B, W]
