"""Conditioning encoders of latent diffusion (Rombach et al. 2022, arXiv 2112.10752, Sec. 3.3)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ldm.modules.encoders.clip_text import CLIPTextModel
from ldm.modules.encoders.tokenizer import CLIPTokenizer

VIT_L_14 = "openai/clip-vit-large-patch14"


class FrozenCLIPEmbedder(nn.Module):
    """Stable Diffusion v1's text conditioner: prompts -> CLIP final-layer-norm states ``[B, L, W]``.

    Built offline with random weights (the sd-v1 checkpoint fills ``transformer.text_model.*``).
    ``version`` exists for CompVis configs and must name ViT-L/14; other sizes are set through
    the explicit arguments. ``freeze=False`` keeps it trainable (DreamBooth tunes it);
    ``use_checkpoint`` recomputes each encoder layer in the backward pass (gradient checkpointing).
    """

    def __init__(self, version: str = VIT_L_14, max_length: int = 77, vocab_size: int = 49408,
                 width: int = 768, layers: int = 12, heads: int = 12, mlp_ratio: int = 4,
                 act: str = "quick_gelu", freeze: bool = True, use_checkpoint: bool = False):
        super().__init__()
        if version != VIT_L_14:
            raise ValueError(
                f"FrozenCLIPEmbedder: version {version!r} is not supported; nothing is downloaded, "
                f"the model is built as {VIT_L_14!r} (or from width/layers/heads) and its weights "
                "come from the Stable Diffusion checkpoint"
            )
        self.max_length = max_length
        self.tokenizer = CLIPTokenizer(context_length=max_length)
        self.transformer = CLIPTextModel(vocab_size, width, layers, heads, max_length, mlp_ratio, act)
        self.transformer.text_model.encoder.gradient_checkpointing = use_checkpoint  # matters when trained
        if freeze:
            self.freeze()

    def freeze(self) -> "FrozenCLIPEmbedder":
        """Stop gradients and switch to eval mode."""
        self.requires_grad_(False)
        return self.eval()

    def tokenize(self, text: str | Sequence[str]) -> torch.Tensor:
        """Prompts -> ids ``[B, max_length]`` on CPU: bos, tokens, eos, eos padding."""
        return self.tokenizer(text)

    def forward(self, text: str | Sequence[str]) -> torch.Tensor:
        weight = self.transformer.text_model.embeddings.token_embedding.weight
        tokens = self.tokenize(text).to(weight.device)  # [B, L]
        return self.transformer(tokens)  # [B, L, W]

    def encode(self, text: str | Sequence[str]) -> torch.Tensor:
        """CompVis name for ``forward``."""
        return self(text)
