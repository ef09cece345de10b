"""OPT decoder-only language model (Zhang et al. 2022, arXiv 2205.01068), the frozen LLM of BLIP-2.

Pre-LN blocks with ReLU FFNs, learned absolute positions looked up at ``position + 2`` (fairseq's
offset), positions counted over the attention mask so left padding is skipped, the output head tied
to the token embedding. Module names follow transformers' ``OPTForCausalLM`` so Hub weights load
by name. In train mode ``dropout`` falls on each block's attention and FFN outputs before their
residual adds, ``attention_dropout`` on the attention probabilities (none on the embeddings).
BLIP-2 keeps OPT frozen in eval mode, so they act only when OPT is fine-tuned. Decoding runs over
``KVCache`` (preallocated keys and values) through ``DecodingSession``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from blip2.config import activation

POSITION_OFFSET = 2


class KVCache:
    """Keys and values of every layer, preallocated to ``capacity`` positions: [N, h, capacity, d].

    ``expand`` repeats each row for the beams (or returned samples) of its input; the positions
    cached then (the prefix) are equal within each input's rows from there on. ``select`` reorders
    the rows within inputs (the beam step), so it moves only the positions after that prefix, in
    place: they go to a scratch buffer and back (2 copies of the new positions instead of one of
    the whole sequence, as long as fewer positions follow the prefix than it holds; otherwise the
    whole filled part goes in one copy into a spare buffer of the tensor's shape, which replaces it,
    the buffer left being the spare of the next tensor). Either way the reorder needs one
    tensor's worth of memory beyond the cache, and only while it runs.
    """

    def __init__(self, depth: int, capacity: int):
        self.capacity = capacity
        self.length = 0
        self.shared = 0  # positions [0, shared) are equal within each input's rows (set by expand)
        self.rows_per_input = 1
        self.keys: list[torch.Tensor | None] = [None] * depth
        self.values: list[torch.Tensor | None] = [None] * depth

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new [N, h, T, d] keys/values of ``layer``; return all of them so far."""
        if self.keys[layer] is None:
            shape = (*k.shape[:2], self.capacity, k.shape[-1])
            self.keys[layer], self.values[layer] = k.new_empty(shape), v.new_empty(shape)
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def expand(self, rows_per_input: int) -> None:
        """Repeat each row ``rows_per_input`` times (row i -> rows i*k .. i*k + k - 1). Layer by layer,
        each old buffer dropped as soon as its replacement exists: expanding the batch to the beams
        (16 -> 80 rows at full size) never holds the old cache beside the new one."""
        if self.keys[0] is None:
            return
        index = torch.arange(self._rows(), device=self._device()).repeat_interleave(rows_per_input)
        self._select_whole(index)
        self.shared, self.rows_per_input = self.length, rows_per_input

    def select(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` [N], each taken from the rows of the same input (a beam reorder). An
        index that takes rows from other inputs is moved whole, and the prefix is no longer shared."""
        new = self.length - self.shared
        if self.keys[0] is None or self.length == 0:
            return
        if self.shared and not self._within_inputs(index):
            self._select_whole(index)
            self.shared = 0
            return
        if new == 0:
            return
        if 2 * new >= self.length:
            self._select_whole(index)
            return
        scratch = None
        for store in (self.keys, self.values):
            for buf in store:
                part = buf[:, :, self.shared:self.length]  # (N, h, new, d)
                if scratch is None or scratch.numel() < part.numel() or scratch.dtype != buf.dtype:
                    scratch = buf.new_empty(buf[:, :, self.shared:].numel())
                out = scratch[:part.numel()].view(part.shape)
                torch.index_select(part, 0, index, out=out)
                part.copy_(out)

    def _select_whole(self, index: torch.Tensor) -> None:
        spare = None
        for store in (self.keys, self.values):
            for i, buf in enumerate(store):
                if buf is None:
                    continue
                shape = (index.shape[0], *buf.shape[1:])
                out = spare if spare is not None and spare.shape == shape and spare.dtype == buf.dtype \
                    else buf.new_empty(shape)
                torch.index_select(buf[:, :, :self.length], 0, index, out=out[:, :, :self.length])
                store[i], spare = out, (buf if buf.shape == shape else None)

    def _within_inputs(self, index: torch.Tensor) -> bool:
        rows = torch.arange(index.shape[0], device=index.device)
        return index.shape[0] == self._rows() and bool((index // self.rows_per_input == rows // self.rows_per_input).all())

    def _rows(self) -> int:
        return next(b.shape[0] for b in self.keys if b is not None)

    def _device(self) -> torch.device:
        return next(b.device for b in self.keys if b is not None)


def attention_mask(key_mask: torch.Tensor, num_queries: int) -> torch.Tensor:
    """Causal mask over valid keys for the last ``num_queries`` positions: [N, 1, T, S], True = attend.

    A position always sees itself, so padded rows stay finite (their outputs are never used).
    """
    total = key_mask.shape[1]
    q_pos = torch.arange(total - num_queries, total, device=key_mask.device)[:, None]
    k_pos = torch.arange(total, device=key_mask.device)[None]
    allowed = ((k_pos <= q_pos) & key_mask.bool()[:, None, :]) | (k_pos == q_pos)  # (N, T, S)
    return allowed[:, None]


class OPTAttention(nn.Module):
    """Causal multi-head self-attention; queries are scaled by d^-1/2 before the product, as in OPT;
    ``dropout`` on the attention probabilities in train mode."""

    def __init__(self, dim: int = 2560, heads: int = 32, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.scale = (dim // heads) ** -0.5
        self.k_proj = nn.Linear(dim, dim, bias=bias)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        q = rearrange(self.q_proj(x) * self.scale, "b n (h d) -> b h n d", h=self.heads)
        k = rearrange(self.k_proj(x), "b n (h d) -> b h n d", h=self.heads)
        v = rearrange(self.v_proj(x), "b n (h d) -> b h n d", h=self.heads)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, h, S, d)
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=1.0)  # (B, h, T, d)
        return self.out_proj(rearrange(out, "b h n d -> b n (h d)"))  # (B, T, D)


class OPTDecoderLayer(nn.Module):
    """Pre-LN block: x + drop(attn(LN(x))), then x + drop(fc2(act(fc1(LN(x)))))."""

    def __init__(self, dim: int = 2560, heads: int = 32, ffn_dim: int = 10240, act: str = "relu",
                 bias: bool = True, norm_affine: bool = True, dropout: float = 0.1, attention_dropout: float = 0.0):
        super().__init__()
        self.act = activation(act)
        self.dropout = nn.Dropout(dropout)
        self.self_attn = OPTAttention(dim, heads, bias, attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(dim, elementwise_affine=norm_affine)
        self.fc1 = nn.Linear(dim, ffn_dim, bias=bias)
        self.fc2 = nn.Linear(ffn_dim, dim, bias=bias)
        self.final_layer_norm = nn.LayerNorm(dim, elementwise_affine=norm_affine)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.self_attn_layer_norm(x), mask, cache, layer))  # (B, T, D)
        return x + self.dropout(self.fc2(self.act(self.fc1(self.final_layer_norm(x)))))  # (B, T, D)


class OPTDecoder(nn.Module):
    """Token/position embeddings, the layer stack and the final LayerNorm."""

    def __init__(self, vocab_size: int = 50272, dim: int = 2560, depth: int = 32, heads: int = 32,
                 ffn_dim: int = 10240, max_positions: int = 2048, act: str = "relu", bias: bool = True,
                 norm_affine: bool = True, pad_token_id: int | None = 1, dropout: float = 0.1,
                 attention_dropout: float = 0.0):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, dim, padding_idx=pad_token_id)
        self.embed_positions = nn.Embedding(max_positions + POSITION_OFFSET, dim)
        self.final_layer_norm = nn.LayerNorm(dim, elementwise_affine=norm_affine)
        self.layers = nn.ModuleList([OPTDecoderLayer(dim, heads, ffn_dim, act, bias, norm_affine, dropout,
                                                     attention_dropout) for _ in range(depth)])
        self.gradient_checkpointing = False  # training (no cache): recompute each layer in backward

    def forward(self, embeds: torch.Tensor, key_mask: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """``embeds`` [B, T, D] continue the cached sequence; ``key_mask`` [B, S] marks the valid
        positions of the whole sequence (S = cached + T). Returns hidden states [B, T, D]."""
        past = cache.length if cache is not None else 0
        positions = (key_mask.long().cumsum(-1) - 1).clamp_min(0)[:, past:]  # (B, T)
        x = embeds + self.embed_positions(positions + POSITION_OFFSET).to(embeds.dtype)  # (B, T, D)
        mask = attention_mask(key_mask, embeds.shape[1])  # (B, 1, T, S)
        recompute = self.gradient_checkpointing and cache is None and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            x = checkpoint(layer, x, mask, cache, i, use_reentrant=False) if recompute else layer(x, mask, cache, i)
        if cache is not None:
            cache.length += embeds.shape[1]
        return self.final_layer_norm(x)  # (B, T, D)


class OPTForCausalLM(nn.Module):
    """OPT with the output head ``lm_head`` tied to ``model.decoder.embed_tokens``."""

    def __init__(self, vocab_size: int = 50272, dim: int = 2560, depth: int = 32, heads: int = 32,
                 ffn_dim: int = 10240, max_positions: int = 2048, act: str = "relu", bias: bool = True,
                 norm_affine: bool = True, pad_token_id: int | None = 1, dropout: float = 0.1,
                 attention_dropout: float = 0.0):
        super().__init__()
        decoder = OPTDecoder(vocab_size, dim, depth, heads, ffn_dim, max_positions, act, bias, norm_affine,
                             pad_token_id, dropout, attention_dropout)
        self.model = nn.ModuleDict({"decoder": decoder})
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        self.tie_weights()

    @property
    def decoder(self) -> OPTDecoder:
        return self.model.decoder

    def tie_weights(self) -> None:
        """Share the token embedding with the output head (OPT's ``tie_word_embeddings``)."""
        self.lm_head.weight = self.decoder.embed_tokens.weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.embed_tokens(input_ids)  # (B, T, D)

    def forward(self, embeds: torch.Tensor, key_mask: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits [B, T, V] for ``embeds`` [B, T, D] (see ``OPTDecoder.forward``)."""
        return self.lm_head(self.decoder(embeds, key_mask, cache))


class DecodingSession:
    """One growing batch of sequences fed to an ``OPTForCausalLM`` token by token.

    With ``use_cache`` the keys and values of past positions are kept (``KVCache``); without it the
    whole sequence is recomputed each step (the baseline that shows what the cache buys).
    Logits come back in float32, as the decoding rules expect.
    """

    def __init__(self, lm: OPTForCausalLM, embeds: torch.Tensor, key_mask: torch.Tensor, max_new_tokens: int,
                 use_cache: bool = True):
        self.lm = lm
        self.embeds, self.key_mask = embeds, key_mask.bool()  # (N, S, D), (N, S)
        # the decoding rules feed back at most max_new_tokens - 1 tokens (the last one ends the loop)
        capacity = embeds.shape[1] + max(max_new_tokens - 1, 0)
        self.cache = KVCache(len(lm.decoder.layers), capacity) if use_cache else None

    def prefill(self) -> torch.Tensor:
        """Run the prefix; next-token logits [N, V]."""
        return self._last_logits(self.embeds)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append ``tokens`` [N] (always attended, as in transformers); next-token logits [N, V]."""
        new = self.lm.embed(tokens[:, None])  # (N, 1, D)
        self.key_mask = torch.cat([self.key_mask, self.key_mask.new_ones(tokens.shape[0], 1)], dim=1)
        if self.cache is not None:
            return self._last_logits(new)
        self.embeds = torch.cat([self.embeds, new], dim=1)
        return self._last_logits(self.embeds)

    def expand(self, rows_per_input: int) -> None:
        """Repeat each row ``rows_per_input`` times, for the beams or samples of its input."""
        self.key_mask = self.key_mask.repeat_interleave(rows_per_input, 0)
        if self.cache is None:
            self.embeds = self.embeds.repeat_interleave(rows_per_input, 0)
        else:
            self.cache.expand(rows_per_input)

    def select(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` [N], each from the rows of the same input (the beam reorder)."""
        self.key_mask = self.key_mask.index_select(0, index)
        if self.cache is None:
            self.embeds = self.embeds.index_select(0, index)
        else:
            self.cache.select(index)

    def _last_logits(self, embeds: torch.Tensor) -> torch.Tensor:
        hidden = self.lm.decoder(embeds, self.key_mask, self.cache)[:, -1]  # (N, D)
        return self.lm.lm_head(hidden).float()  # (N, V)
