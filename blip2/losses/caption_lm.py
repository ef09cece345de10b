"""The caption loss of stage 2 and caption fine-tuning: BLIP-2's generative objective through OPT
(arXiv 2301.12597 Sec. 3.3). (Stage 1's text-generation loss of the Q-Former is
``blip2.losses.stage1.itg_loss``.)

The visual prompt (Q query outputs) is followed by the text ``bos + prompt + caption + "\\n"``
(right-padded, at most ``max_length`` tokens with bos, as LAVIS's ``max_txt_len``); the loss is
the language-modelling loss of the caption and its "\\n" end:

    L = - (1 / N) sum_{t in targets} log p(w_t | queries, w_<t),

N the number of target tokens in the batch. Labels are -100 (ignored) on the Q query positions, on
padding, and on the first ``prompt_length`` text tokens (bos + prompt) when there is a prompt; with
no prompt the bos after the queries is a target, as in LAVIS ``Blip2OPT.forward``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
CAPTION_END = "\n"


@dataclass
class CaptionTokens:
    """Right-padded text ids [B, T], their mask and the labels (-100 where no loss)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def prompt_length(tokenizer: Any, prompt: str) -> int:
    """Tokens of bos + ``prompt`` (0 for no prompt: nothing is masked beyond padding)."""
    return len(tokenizer(prompt)["input_ids"]) if prompt else 0


def with_prompt(prompt: str, captions: Sequence[str]) -> list[str]:
    """``"a photo of" + " " + caption`` (LAVIS prepends ``"a photo of "`` in its text processor)."""
    return [f"{prompt} {c}" if prompt else c for c in captions]


def caption_tokens(tokenizer: Any, texts: Sequence[str], prompt_len: int = 0, max_length: int = 32) -> CaptionTokens:
    """Tokenise ``text + "\\n"`` (bos first, right padding, truncation) and build the labels."""
    enc = tokenizer([t + CAPTION_END for t in texts], padding="longest", truncation=True, max_length=max_length,
                    padding_side="right", return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, IGNORE_INDEX)
    labels[:, :prompt_len] = IGNORE_INDEX
    return CaptionTokens(enc["input_ids"], enc["attention_mask"], labels)


def opt_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (float32) of ``logits`` [B, T, V], row t predicting the text
    token t (``Blip2OPT.text_logits``), against the labels [B, T]."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)


def caption_loss(model: Any, pixel_values: torch.Tensor, tokens: CaptionTokens) -> torch.Tensor:
    """L of ``Blip2OPT`` ``model`` on images [B, 3, H, W] and their caption tokens."""
    device = pixel_values.device
    logits = model.text_logits(pixel_values, tokens.input_ids.to(device), tokens.attention_mask.to(device))
    return opt_lm_loss(logits, tokens.labels.to(device))  # logits (B, T, V)
