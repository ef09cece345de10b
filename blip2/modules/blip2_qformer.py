"""The BLIP-2 stage-1 network: the Q-Former that learns to pull text-relevant visual features out of
a frozen image encoder (Li et al. 2023, arXiv 2301.12597, Sec. 3.2, Fig. 2; LAVIS ``Blip2Qformer``),
a plain ``nn.Module`` (its training system is ``blip2.models.stage1.Blip2Stage1``).

Frozen EVA ViT -> 32 learned queries through the Q-Former (cross-attention to the image) ->
``vision_projection`` -> z [B, Q, E]; text -> the same Q-Former (text path, no image) ->
``text_projection`` of [CLS] -> t [B, E]. Three losses share the Q-Former (``blip2.losses.stage1``):
ITC (max over queries of <z, t> / temp), ITM (queries + text, bi-directional, 2-way head averaged
over the queries, hard negatives) and ITG (BERT LM head under the UniLM mask, [DEC] as bos).

Module names follow transformers' ``Blip2ForImageTextRetrieval`` (``vision_model``,
``query_tokens``, ``embeddings``, ``qformer``, ``vision_projection``, ``text_projection``,
``itm_head``), so a Hub folder such as ``Salesforce/blip2-itm-vit-g`` loads by name; ``temp``
and the ITG head ``lm_head`` are stage-1 training parts that such folders do not hold.

Text: BERT's WordPiece tokenizer (``bert-base-uncased``) with an added ``[DEC]`` bos token (id
30522, vocabulary 30523), captions padded to ``max_txt_len``. Pass a folder with its files
(``vocab.txt`` + ``tokenizer_config.json`` or ``tokenizer.json``): the ``bert-base-uncased``
repository on the Hugging Face Hub, or the tokenizer files of ``Salesforce/blip2-itm-vit-g``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from blip2.config import activation, normalize_config, qformer_args, vision_args
from blip2.hub import load_tokenizer
from blip2.modules.eva_vit import EvaViT
from blip2.modules.qformer import QFormer, QFormerTextEmbeddings
from blip2.processors import CLIP_MEAN, CLIP_STD
from blip2.losses.stage1 import padding_mask
from blip2.stage1_weights import load_retrieval_folder

DEC_TOKEN = "[DEC]"  # LAVIS' decoder bos for ITG, added to bert-base-uncased
STAGE1_QFORMER = dict(vocab_size=30523, use_qformer_text_input=True)  # BERT vocab + [DEC], text path on


def bert_tokenizer(source: str | os.PathLike | Any) -> Any:
    """A BERT tokenizer with ``[DEC]`` as bos: from a folder of tokenizer files, or a tokenizer object."""
    if isinstance(source, (str, os.PathLike)):
        tokenizer = load_tokenizer(Path(source)) if Path(source).is_dir() else None
        if tokenizer is None:
            raise ValueError(f"tokenizer {source}: expected a folder with BERT tokenizer files "
                             "(vocab.txt + tokenizer_config.json, or tokenizer.json)")
    else:
        tokenizer = source
    if tokenizer.bos_token is None:
        tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    tokenizer.padding_side = tokenizer.truncation_side = "right"
    return tokenizer


class QFormerLMHead(nn.Module):
    """The ITG head (BERT's LM head, LAVIS ``Qformer.cls.predictions``): dense -> act -> LayerNorm,
    then the (tied) word-embedding matrix plus a bias -> logits over the vocabulary."""

    def __init__(self, dim: int = 768, vocab_size: int = 30523, eps: float = 1e-12, act: str = "gelu"):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.act = activation(act)
        self.LayerNorm = nn.LayerNorm(dim, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, x: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(self.LayerNorm(self.act(self.dense(x))), word_embeddings, self.bias)  # (B, T, V)


def stage1_config(vision_config: Mapping[str, Any] | None, qformer_config: Mapping[str, Any] | None,
                  num_query_tokens: int) -> dict[str, Any]:
    """A normalised BLIP-2 config (transformers field names) with the stage-1 Q-Former defaults."""
    qformer = {**STAGE1_QFORMER, **dict(qformer_config or {})}
    if not qformer["use_qformer_text_input"]:
        raise ValueError("qformer_config.use_qformer_text_input: stage 1 needs the text path, got false")
    return normalize_config({"vision_config": dict(vision_config or {}), "qformer_config": qformer,
                             "num_query_tokens": num_query_tokens})


class Blip2Qformer(nn.Module):
    """BLIP-2 stage-1 network: ViT + Q-Former with the ITC projections, ITM and ITG heads.

    ``vision_config`` / ``qformer_config``: transformers ``Blip2Config`` fields (defaults: EVA
    ViT-g/14 at 224 px, BERT-base with 30523 tokens). ``tokenizer``: see the module notes.
    ``temp``: the initial ITC temperature. Weights start as BERT's random initialisation; the
    Hub's retrieval folders load with ``from_pretrained``.
    """

    def __init__(self, vision_config: Mapping[str, Any] | None = None,
                 qformer_config: Mapping[str, Any] | None = None, num_query_tokens: int = 32,
                 embed_dim: int = 256, max_txt_len: int = 32, tokenizer: str | os.PathLike | Any = None,
                 temp: float = 0.07, image_mean: Sequence[float] = CLIP_MEAN, image_std: Sequence[float] = CLIP_STD):
        super().__init__()
        cfg = stage1_config(vision_config, qformer_config, num_query_tokens)
        q, qcfg = qformer_args(cfg), cfg["qformer_config"]
        self.vision_model = EvaViT(**vision_args(cfg))
        self.query_tokens = nn.Parameter(torch.zeros(1, num_query_tokens, q["dim"]))
        self.embeddings = QFormerTextEmbeddings(qcfg["vocab_size"], q["dim"], qcfg["max_position_embeddings"],
                                                qcfg["pad_token_id"])
        self.qformer = QFormer(**q)
        self.vision_projection = nn.Linear(q["dim"], embed_dim)
        self.text_projection = nn.Linear(q["dim"], embed_dim)
        self.itm_head = nn.Linear(q["dim"], 2)
        self.temp = nn.Parameter(torch.tensor(float(temp)))
        self.lm_head = QFormerLMHead(q["dim"], qcfg["vocab_size"], q["eps"], q["act"])
        self.config, self.max_txt_len = cfg, max_txt_len
        self.image_size, self.image_dim = vision_args(cfg)["image_size"], vision_args(cfg)["width"]
        self.initial_temp = float(temp)
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.tokenizer = None if tokenizer is None else self._checked_tokenizer(bert_tokenizer(tokenizer))
        self.init_weights()

    # ---- construction ----------------------------------------------------------------------------
    def _checked_tokenizer(self, tokenizer: Any) -> Any:
        vocab = self.embeddings.word_embeddings.num_embeddings
        if len(tokenizer) > vocab:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens (with {DEC_TOKEN}) but "
                             f"qformer_config.vocab_size is {vocab}")
        return tokenizer

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """BERT's initialisation (LAVIS) for everything but the ViT (loaded from EVA); temp = 0.07."""
        for module in [self.embeddings, self.qformer, self.vision_projection, self.text_projection, self.itm_head,
                       self.lm_head]:
            for m in module.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    m.weight.normal_(0.0, std)
                if isinstance(m, nn.Linear):
                    m.bias.zero_()
                if isinstance(m, nn.LayerNorm):
                    m.weight.fill_(1.0)
                    m.bias.zero_()
        self.lm_head.bias.zero_()
        self.query_tokens.normal_(0.0, std)
        self.temp.fill_(self.initial_temp)

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, device: str | torch.device = "cpu",
                        vit: str | os.PathLike | None = None, **kwargs: Any) -> "Blip2Qformer":
        """A Hub ``Blip2ForImageTextRetrieval`` folder (config, safetensors, tokenizer, preprocessor
        config), every key of that layout matched strictly; ``temp`` and ``lm_head`` keep their
        initial values (the folders do not hold them). Or LAVIS's stage-1 file
        (``blip2_pretrained.pth``, ``blip2.lavis``) with ``vit`` the EVA ViT file, unless it holds
        its own ViT. ``kwargs``: further constructor arguments (e.g. ``tokenizer``, ``max_txt_len``)."""
        if Path(source).is_dir():
            return load_retrieval_folder(cls, Path(source), device, **kwargs)
        from blip2.lavis import load_lavis_stage1

        return load_lavis_stage1(source, vit, device=device, **kwargs)

    # ---- features ----------------------------------------------------------------------------------
    @property
    def num_queries(self) -> int:
        return self.query_tokens.shape[1]

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """ln_vision(ViT(pixels)) [B, 1+N, D_img]. With a frozen ViT (``Blip2Stage1``) autograd records
        nothing before ``ln_vision`` (no block input or weight needs a gradient), so the blocks cost
        no memory."""
        return self.vision_model(pixel_values)

    def queries(self, batch: int) -> torch.Tensor:
        return self.query_tokens.expand(batch, -1, -1)  # (B, Q, D)

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts -> ([CLS] ... [SEP] ids, mask), each [B, max_txt_len] (right-padded, truncated)."""
        if self.tokenizer is None:
            raise ValueError("Blip2Qformer has no tokenizer: pass params.tokenizer (a BERT tokenizer folder)")
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_txt_len,
                             return_tensors="pt")
        device = self.query_tokens.device
        return enc["input_ids"].to(device), enc["attention_mask"].to(device)

    def project_queries(self, query_output: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.vision_projection(query_output), dim=-1)  # (B, Q, E)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """z: normalised query features [B, Q, E] for ITC / retrieval."""
        image = self.image_embeds(pixel_values)  # (B, 1+N, D_img)
        return self.project_queries(self.qformer(self.queries(image.shape[0]), image))  # (B, Q, E)

    def text_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The text-only, bi-directional Q-Former pass (BERT as an encoder): [B, T, D]."""
        text = self.embeddings(input_ids)  # (B, T, D)
        no_image = text.new_zeros(text.shape[0], 0, self.image_dim)  # no queries: no cross-attention
        return self.qformer(text[:, :0], no_image, text, padding_mask(0, attention_mask))  # (B, T, D)

    def text_features_from_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """t: normalised [CLS] features [B, E]."""
        return F.normalize(self.text_projection(self.text_hidden(input_ids, attention_mask)[:, 0]), dim=-1)

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        return self.text_features_from_ids(*self.tokenize(texts))  # (B, E)

    @staticmethod
    def similarity(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
        """ITC scores without temperature: max over queries of cosine similarity, [N_img, N_txt]."""
        return torch.einsum("iqe,te->itq", image_feats, text_feats).amax(-1)

    def itm_logits_from_embeds(self, image: torch.Tensor, input_ids: torch.Tensor,
                               attention_mask: torch.Tensor) -> torch.Tensor:
        """ITM logits [B, 2] (no match, match) for image features [B, 1+N, D_img] paired with texts."""
        hidden = self.qformer(self.queries(image.shape[0]), image, self.embeddings(input_ids),
                              padding_mask(self.num_queries, attention_mask))  # (B, Q+T, D)
        return self.itm_head(hidden[:, :self.num_queries]).mean(dim=1)  # (B, 2)

    def itm_score(self, pixel_values: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """Probability that image i shows text i, [B]."""
        logits = self.itm_logits_from_embeds(self.image_embeds(pixel_values), *self.tokenize(texts))
        return logits.softmax(dim=-1)[:, 1]

    def temperature(self) -> torch.Tensor:
        """tau, kept in BLIP's bounds [0.001, 0.5] (LAVIS' Blip2Qformer sets none; 0.07 stays inside)."""
        return self.temp.clamp(0.001, 0.5)
