"""BLIP-2 with an OPT language model (Li et al. 2023, arXiv 2301.12597, Sec. 3.3, Fig. 3).

image -> EVA ViT-g -> Q-Former queries (fp32) -> ``language_projection`` -> soft visual prompt
of ``num_query_tokens`` vectors in front of the text, decoded by OPT. Two Hub layouts:
``image_token_index`` set (the text starts with that many ``<image>`` ids whose embeddings are
replaced by the queries; transformers' processors see those ids), or ``None`` (the older one:
the query embeddings are prepended and, as in LAVIS, the processors see only new tokens).
Either way the sequence is [queries; left-padded bos + prompt].
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from blip2.config import normalize_config, opt_args, qformer_args, vision_args
from blip2.generation import GenerationSettings, decode
from blip2.modules.eva_vit import EvaViT
from blip2.modules.opt import DecodingSession, OPTForCausalLM
from blip2.modules.qformer import QFormer
from blip2.processors import CLIP_MEAN, CLIP_STD

OPT_NEWLINE_ID = 50118  # "\n" in OPT's BPE: the caption end used by BLIP-2
VQA_TEMPLATE = "Question: {} Answer:"  # BLIP-2's zero-shot VQA prompt


def newline_token_id(tokenizer: Any) -> int:
    """The id of "\n", BLIP-2's end of caption; it must be a single token."""
    ids = tokenizer("\n", add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"tokenizer: expected '\\n' to be one token (the caption end), got ids {ids}")
    return ids[0]


def _default_eos(text_config: Mapping[str, Any], tokenizer: Any) -> int:
    if tokenizer is not None:
        return newline_token_id(tokenizer)
    return OPT_NEWLINE_ID if text_config["vocab_size"] > OPT_NEWLINE_ID else text_config["eos_token_id"]


class Blip2OPT(nn.Module):
    """BLIP-2 OPT captioner / VQA model with transformers' ``Blip2ForConditionalGeneration`` keys.

    Build with ``from_pretrained(folder)`` (a Hub HF folder) or ``from_config(config)`` (random
    weights). ``tokenizer``, ``image_size``, ``image_mean`` and ``image_std`` describe the inputs.
    """

    def __init__(self, vision_model: EvaViT, qformer: QFormer, language_model: OPTForCausalLM,
                 num_query_tokens: int = 32, image_token_index: int | None = None, bos_token_id: int = 2,
                 pad_token_id: int | None = 1, eos_token_id: int = OPT_NEWLINE_ID, tokenizer: Any = None,
                 image_size: int = 224, image_mean: Sequence[float] = CLIP_MEAN,
                 image_std: Sequence[float] = CLIP_STD):
        super().__init__()
        qformer_dim, lm_dim = qformer.layernorm.normalized_shape[0], language_model.lm_head.in_features
        self.vision_model = vision_model
        self.query_tokens = nn.Parameter(torch.zeros(1, num_query_tokens, qformer_dim))
        self.qformer = qformer
        self.language_projection = nn.Linear(qformer_dim, lm_dim)
        self.language_model = language_model
        self.image_token_index, self.bos_token_id, self.pad_token_id = image_token_index, bos_token_id, pad_token_id
        self.eos_token_id, self.tokenizer = eos_token_id, tokenizer
        self.image_size, self.image_mean, self.image_std = image_size, tuple(image_mean), tuple(image_std)
        self.config: dict[str, Any] | None = None  # the normalised Blip2Config of ``from_config``
        self.generation_defaults: dict[str, Any] = {}  # e.g. a Hub folder's generation_config.json

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", **inputs: Any) -> "Blip2OPT":
        """Random weights for a ``Blip2Config`` (object or dict). ViT, projection and OPT in ``dtype``;
        the queries and Q-Former stay fp32 (as in BLIP-2). ``inputs``: the remaining constructor
        arguments (tokenizer, image settings, eos: by default "\n" of the tokenizer, else OPT's 50118
        when the vocabulary has it, else the config's eos)."""
        cfg = normalize_config(config)
        text = cfg["text_config"]
        inputs = {"eos_token_id": _default_eos(text, inputs.get("tokenizer")),
                  "image_size": vision_args(cfg)["image_size"], **inputs}
        with torch.device(device):
            model = cls(EvaViT(**vision_args(cfg)), QFormer(**qformer_args(cfg)), OPTForCausalLM(**opt_args(cfg)),
                        cfg["num_query_tokens"], cfg["image_token_index"], text["bos_token_id"],
                        text["pad_token_id"], **inputs)
        model.config = cfg
        return model.set_precision(dtype).eval()

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", **files: Any) -> "Blip2OPT":
        """Load strictly (``blip2.loading.load_blip2``): a Hub HF folder (config, weights, tokenizer,
        preprocessor and generation configs); a Lightning checkpoint of ours (``tokenizer=`` a
        folder when it names none); a LAVIS checkpoint with ``opt=`` its OPT folder and ``vit=``
        the EVA ViT file (unless it holds its own ViT)."""
        if Path(source).is_dir() and not files:
            from blip2.hub import load_pretrained

            return load_pretrained(cls, source, dtype, device)
        from blip2.loading import load_blip2

        return load_blip2(source, dtype=dtype, device=device, **files)[0]

    def set_precision(self, dtype: torch.dtype) -> "Blip2OPT":
        """ViT, projection and OPT in ``dtype``; ``query_tokens`` and the Q-Former in fp32."""
        for part in (self.vision_model, self.language_projection, self.language_model):
            part.to(dtype)
        self.qformer.float()
        self.query_tokens.data = self.query_tokens.data.float()
        return self

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, H, W] -> the visual prompt [B, Q, D_lm] in the language model's dtype."""
        image = self.vision_model(pixel_values)  # (B, 1+N, D_img)
        queries = self.qformer(self.query_tokens.expand(image.shape[0], -1, -1), image)  # (B, Q, D_q) fp32
        return self.language_projection(queries.to(image.dtype))  # (B, Q, D_lm)

    def prefix(self, visual: torch.Tensor, input_ids: torch.Tensor,
               attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[queries; text] embeddings [B, Q+T, D], their mask [B, Q+T], and the ids the logits
        processors see ([image ids; text] in the ``<image>`` layout, none in the older one)."""
        text = self.language_model.embed(input_ids)  # (B, T, D)
        embeds = torch.cat([visual.to(text.dtype), text], dim=1)  # (B, Q+T, D)
        key_mask = torch.cat([attention_mask.new_ones(visual.shape[:2]), attention_mask], dim=1)
        if self.image_token_index is None:
            return embeds, key_mask, input_ids[:, :0]
        image_ids = input_ids.new_full(visual.shape[:2], self.image_token_index)
        return embeds, key_mask, torch.cat([image_ids, input_ids], dim=1)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, Q+T, V] over the visual prompt and the (bos-led, left-padded) text ids [B, T]."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        embeds, key_mask, _ = self.prefix(self.encode_image(pixel_values), input_ids, mask)
        return self.language_model(embeds, key_mask)

    def text_logits(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] predicting each text token [B, T] from the position before it (the last
        query for the first): all the language-modelling loss needs, so the output head runs on T of
        the Q+T positions."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        embeds, key_mask, _ = self.prefix(self.encode_image(pixel_values), input_ids, mask)
        hidden = self.language_model.decoder(embeds, key_mask)  # (B, Q+T, D)
        return self.language_model.lm_head(hidden[:, -input_ids.shape[1] - 1:-1])  # (B, T, V)

    def generation_settings(self, generation_config: Any = None, **options: Any) -> GenerationSettings:
        """Options merged over this model's defaults (eos "\\n", OPT's pad, then ``generation_defaults``)."""
        defaults = {"eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id, **self.generation_defaults}
        return GenerationSettings.build(generation_config, defaults, **options)

    @torch.no_grad()
    def generate_ids(self, pixel_values: torch.Tensor, input_ids: torch.Tensor | None = None,
                     attention_mask: torch.Tensor | None = None, generation_config: Any = None,
                     **options: Any) -> torch.Tensor:
        """New token ids [B * num_return_sequences, L] (pad after eos) for text ids [B, T] that start
        with bos (default: bos alone), left-padded, without ``<image>`` ids."""
        settings = self.generation_settings(generation_config, **options)
        batch, device = pixel_values.shape[0], self.query_tokens.device
        if input_ids is None:
            input_ids = torch.full((batch, 1), self.bos_token_id, dtype=torch.long)
        input_ids = input_ids.to(device)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
        embeds, key_mask, history = self.prefix(self.encode_image(pixel_values.to(device)), input_ids, mask)
        session = DecodingSession(self.language_model, embeds, key_mask, settings.max_new_tokens, settings.use_cache)
        return decode(session, history, settings)

    def generate(self, pixel_values: torch.Tensor, prompt: str | Sequence[str] | None = None,
                 generation_config: Any = None, **options: Any) -> list[str]:
        """Captions (or answers) for a batch of images; ``prompt``: one for all or one per image. The
        prompt is not echoed. Returns B * num_return_sequences strings, image-major."""
        input_ids, mask = self.tokenize(prompt, pixel_values.shape[0])
        ids = self.generate_ids(pixel_values, input_ids, mask, generation_config, **options)
        return self.decode_text(ids, self.generation_settings(generation_config, **options).eos_token_id)

    def answer(self, pixel_values: torch.Tensor, questions: str | Sequence[str],
               template: str = VQA_TEMPLATE, **options: Any) -> list[str]:
        """Zero-shot VQA: each question put into ``template`` as the prompt."""
        questions = [questions] * pixel_values.shape[0] if isinstance(questions, str) else list(questions)
        return self.generate(pixel_values, [template.format(q) for q in questions], **options)

    def tokenize(self, prompt: str | Sequence[str] | None, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> left-padded ids [B, T] (bos first) and their mask."""
        if self.tokenizer is None:
            raise ValueError("this Blip2OPT has no tokenizer: load a folder with tokenizer files or use generate_ids")
        prompts = [prompt or ""] * batch if prompt is None or isinstance(prompt, str) else list(prompt)
        if len(prompts) != batch:
            raise ValueError(f"got {len(prompts)} prompts for {batch} images; give one prompt or one per image")
        self.tokenizer.padding_side = "left"
        enc = self.tokenizer(prompts, padding=True, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def decode_text(self, ids: torch.Tensor, eos_token_id: Sequence[int]) -> list[str]:
        """Token rows -> strings, cut at the first eos, special tokens dropped, whitespace stripped."""
        texts = []
        for row in ids.tolist():
            end = next((i for i, t in enumerate(row) if t in eos_token_id), len(row))
            texts.append(self.tokenizer.decode(row[:end], skip_special_tokens=True).strip())
        return texts
