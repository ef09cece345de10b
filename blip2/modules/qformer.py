"""The Querying Transformer (Q-Former) of BLIP-2 (Li et al. 2023, arXiv 2301.12597, Sec. 3.1, Fig. 2).

A BERT-base encoder (post-LN) over ``num_query_tokens`` learned queries that cross-attend to the
frozen image features every ``cross_attention_frequency``-th layer (layers 0, 2, ...). Queries have
no position embedding and their own FFN (``intermediate_query`` / ``output_query``). The stage-1
text path (text tokens sharing the self-attention with the queries, their own FFN
``intermediate`` / ``output``, and ``QFormerTextEmbeddings``) is built with ``text_ffn=True``.
Module names follow transformers' ``Blip2QFormerModel`` so the Hub weights load by name.
Dropout as in BERT (active in train mode only, no parameters): ``hidden_dropout`` on the input
after the first LayerNorm and on every ``dense`` output before its add & norm, ``attention_dropout``
on the attention probabilities.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from blip2.config import activation


class MultiHeadAttention(nn.Module):
    """BERT attention projections ``query`` / ``key`` / ``value``; keys and values may come from
    another sequence (cross-attention to the image) of width ``kv_dim``; ``dropout`` on the
    attention probabilities in train mode."""

    def __init__(self, dim: int = 768, heads: int = 12, kv_dim: int | None = None, dropout: float = 0.1):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(kv_dim or dim, dim)
        self.value = nn.Linear(kv_dim or dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads)
                   for t in (self.query(x), self.key(context), self.value(context)))
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, h, N, d)
        return rearrange(out, "b h n d -> b n (h d)")  # (B, N, D)


class AddNorm(nn.Module):
    """BERT's post-LN output: LayerNorm(residual + dropout(dense(x))); named ``dense`` / ``LayerNorm``."""

    def __init__(self, in_dim: int = 768, dim: int = 768, eps: float = 1e-12, dropout: float = 0.1):
        super().__init__()
        self.dense = nn.Linear(in_dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.LayerNorm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Intermediate(nn.Module):
    """First FFN layer with its activation; named ``dense``."""

    def __init__(self, dim: int = 768, ffn_dim: int = 3072, act: str = "gelu"):
        super().__init__()
        self.act = activation(act)
        self.dense = nn.Linear(dim, ffn_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class AttentionBlock(nn.Module):
    """Attention followed by add & norm (``attention`` / ``output``)."""

    def __init__(self, dim: int = 768, heads: int = 12, eps: float = 1e-12, kv_dim: int | None = None,
                 hidden_dropout: float = 0.1, attention_dropout: float = 0.1):
        super().__init__()
        self.attention = MultiHeadAttention(dim, heads, kv_dim, attention_dropout)
        self.output = AddNorm(dim, dim, eps, hidden_dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.output(self.attention(x, context, mask), x)


class QFormerLayer(nn.Module):
    """Self-attention over [queries; text], cross-attention of the queries to the image (on
    cross-attention layers), then separate FFNs for queries and text."""

    def __init__(self, dim: int = 768, heads: int = 12, ffn_dim: int = 3072, encoder_dim: int = 1408,
                 eps: float = 1e-12, act: str = "gelu", cross_attention: bool = True, text_ffn: bool = False,
                 hidden_dropout: float = 0.1, attention_dropout: float = 0.1):
        super().__init__()
        self.attention = AttentionBlock(dim, heads, eps, None, hidden_dropout, attention_dropout)
        if cross_attention:
            self.crossattention = AttentionBlock(dim, heads, eps, encoder_dim, hidden_dropout, attention_dropout)
        self.intermediate_query = Intermediate(dim, ffn_dim, act)
        self.output_query = AddNorm(ffn_dim, dim, eps, hidden_dropout)
        if text_ffn:
            self.intermediate = Intermediate(dim, ffn_dim, act)
            self.output = AddNorm(ffn_dim, dim, eps, hidden_dropout)

    def forward(self, x: torch.Tensor, image: torch.Tensor, num_queries: int,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attention(x, x, mask)  # (B, Q+T, D)
        queries, text = x[:, :num_queries], x[:, num_queries:]
        if hasattr(self, "crossattention"):
            queries = self.crossattention(queries, image)  # (B, Q, D)
        queries = self.output_query(self.intermediate_query(queries), queries)  # (B, Q, D)
        if text.shape[1] == 0:
            return queries
        return torch.cat([queries, self.output(self.intermediate(text), text)], dim=1)  # (B, Q+T, D)


class QFormerTextEmbeddings(nn.Module):
    """Stage-1 text input: word + absolute position embeddings (the shared ``layernorm`` follows)."""

    def __init__(self, vocab_size: int = 30522, dim: int = 768, max_positions: int = 512, pad_token_id: int = 0):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, dim, padding_idx=pad_token_id)
        self.position_embeddings = nn.Embedding(max_positions, dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.word_embeddings(input_ids) + self.position_embeddings(positions)  # (B, T, D)


class QFormer(nn.Module):
    """Queries [B, Q, D] (+ optional text embeddings [B, T, D]) attending to image features
    [B, N, D_img] -> [B, Q(+T), D]. Runs in its own parameters' dtype (kept fp32 in BLIP-2)."""

    def __init__(self, dim: int = 768, depth: int = 12, heads: int = 12, ffn_dim: int = 3072,
                 encoder_dim: int = 1408, eps: float = 1e-12, act: str = "gelu",
                 cross_attention_frequency: int = 2, text_ffn: bool = False, hidden_dropout: float = 0.1,
                 attention_dropout: float = 0.1):
        super().__init__()
        self.text_ffn = text_ffn
        self.layernorm = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(hidden_dropout)
        layers = [QFormerLayer(dim, heads, ffn_dim, encoder_dim, eps, act, i % cross_attention_frequency == 0, text_ffn,
                               hidden_dropout, attention_dropout) for i in range(depth)]
        self.encoder = nn.ModuleDict({"layer": nn.ModuleList(layers)})

    def forward(self, queries: torch.Tensor, image: torch.Tensor, text: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask``: boolean self-attention mask broadcastable to [B, heads, Q+T, Q+T], True = attend."""
        if text is not None and not self.text_ffn:
            raise ValueError("QFormer: text input needs the text FFN (build with text_ffn=True)")
        dtype = self.layernorm.weight.dtype
        x = queries if text is None else torch.cat([queries, text.to(queries.dtype)], dim=1)
        x = self.dropout(self.layernorm(x.to(dtype)))  # (B, Q+T, D)
        image = image.to(dtype)
        for layer in self.encoder.layer:
            x = layer(x, image, queries.shape[1], mask)
        return x  # (B, Q+T, D)
