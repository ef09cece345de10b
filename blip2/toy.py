"""The toy world's BLIP-2 captioner: ViT, Q-Former and OPT-style decoder, all trained from scratch on
the coloured shapes of ``toy.shapes`` (configs/toy/blip2.yaml), with a byte-level BPE trained
here on the training captions.

It serves as the toy world's judge of generated images: ``caption_images`` names what an image
shows ("a red circle on a white background"), ``parse_caption`` turns that into attributes, and
``embed_images`` gives unit image embeddings (the mean of the visual prompt, the Q query outputs
projected into OPT's width): the toy analog of CLIP-I / DINO similarity.

    python -m blip2.toy tokenizer --out models/toy/blip2-tokenizer   # the caption tokenizer
    python -m blip2.toy accuracy --model models/toy/blip2 --split test --num 200

Training (``ToyBlip2Finetune``, ``prompt`` ""): BERT-style initialisation, then the loss of
bos + caption + "\\n" after the queries (``blip2.lm_loss``); captioning decodes greedily from bos
(``TOY_GENERATION``) and stops at "\\n".
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from blip2.data.captions import MODES
from blip2.models.blip2_opt import Blip2OPT
from blip2.processors import CLIP_MEAN, CLIP_STD, Blip2ImageProcessor
from blip2.train import Blip2OPTFinetune
from toy.shapes import (
    ATTRIBUTES,
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    attribute_scores,
    parse_caption,
    render,
    scene_of,
)

ROOT = Path(__file__).resolve().parents[1]
TOY_CAPTIONER = ROOT / "models" / "toy" / "blip2"
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # OPT's ids 0, 1, 2, 3
IMAGE_TOKEN = "<image>"
TOY_PROMPT = ""  # the training prompt (configs/toy/blip2.yaml); none: the caption follows bos
TOY_GENERATION = {"num_beams": 1, "max_new_tokens": 12, "min_new_tokens": 0}  # greedy


# ---- the tokenizer -------------------------------------------------------------------------------
def caption_corpus(num: int = 2000, seed: int = 0) -> list[str]:
    """Full captions of the first ``num`` training scenes, each ended by "\\n" (the caption end)."""
    captions = [scene_of("train", seed, i).caption() + "\n" for i in range(num)]
    words = set(" ".join(captions).split())
    missing = (set(COLOURS) | set(SHAPES) | set(BACKGROUNDS)) - words
    if missing:
        raise ValueError(f"{num} training captions miss the attribute words {sorted(missing)}: use more")
    return captions


def train_tokenizer(out: str | os.PathLike, num: int = 2000, seed: int = 0, vocab_size: int = 512) -> Any:
    """Train an OPT-style byte-level BPE on the training captions and save it as an HF folder.

    Ids 0-3 are ``<s> <pad> </s> <unk>``; bos = eos = ``</s>`` (added in front, as OPT's tokenizer
    does), pad ``<pad>``; ``<image>`` is the last id (the visual prompt's placeholder). BPE merges
    stop once every caption word is one token, so the vocabulary is far below ``vocab_size``.
    """
    from tokenizers import AddedToken, ByteLevelBPETokenizer
    from transformers import AutoTokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(caption_corpus(num, seed), vocab_size=vocab_size, min_frequency=1,
                            special_tokens=SPECIAL_TOKENS, show_progress=False)
    bpe.save_model(str(out))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "add_bos_token": True, "bos_token": "</s>", "eos_token": "</s>",
        "pad_token": "<pad>", "unk_token": "<unk>", "model_max_length": 64}))
    tokenizer = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
    tokenizer.save_pretrained(str(out))
    return AutoTokenizer.from_pretrained(str(out), local_files_only=True)


# ---- the data set --------------------------------------------------------------------------------
class ToyCaptions(Dataset):
    """``num`` shapes of a split as BLIP-2 caption items (``blip2.data.captions`` batches).

    ``mode="train"``: ``{"image": (3, s, s) CLIP-normalised, "text_input": full caption}``;
    ``mode="eval"``: ``{"image", "image_id": "split/seed/index", "references": [full caption]}``.
    No augmentation: the procedural scenes already vary position, size and rotation.
    """

    def __init__(self, split: str = "train", num: int = 10000, mode: str = "train", seed: int = 0,
                 image_size: int = 32, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: expected one of {MODES}")
        if num < 1:
            raise ValueError(f"num={num}: expected at least one item")
        scene_of(split, seed, 0)  # checks the split's name
        self.split, self.num, self.mode, self.seed, self.image_size = split, num, mode, seed, image_size
        self.processor = Blip2ImageProcessor(image_size, mean, std)

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < self.num:
            raise IndexError(f"index {i} out of range for {self.num} items")
        scene = scene_of(self.split, self.seed, i)
        image = self.processor([render(scene, self.image_size)])[0]  # (3, s, s)
        if self.mode == "train":
            return {"image": image, "text_input": scene.caption()}
        return {"image": image, "image_id": f"{self.split}/{self.seed}/{i}", "references": [scene.caption()]}


# ---- the model -----------------------------------------------------------------------------------
@torch.no_grad()
def init_weights(model: Blip2OPT, std: float = 0.02) -> Blip2OPT:
    """BERT / OPT initialisation of a random ``Blip2OPT``: N(0, std) linear and embedding weights,
    queries, class and position embeddings; zero biases; unit layer norms. (PyTorch's defaults give
    N(0, 1) token embeddings, so logits of std ~ sqrt(D) through the tied head, and zero queries,
    which stay identical to one another.)"""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            m.weight.normal_(0.0, std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            m.bias.zero_()
        if isinstance(m, nn.LayerNorm):
            m.weight.fill_(1.0)
            m.bias.zero_()
    vision = model.vision_model.embeddings
    for p in (model.query_tokens, vision.class_embedding, vision.position_embedding):
        p.normal_(0.0, std)
    return model


class ToyBlip2Finetune(Blip2OPTFinetune):
    """``Blip2OPTFinetune`` of a model built from ``config``, started from ``init_weights``."""

    def __init__(self, init_std: float = 0.02, **kwargs: Any):
        super().__init__(**kwargs)
        if kwargs.get("pretrained") is None:
            init_weights(self.model, init_std)


# ---- the captioner -------------------------------------------------------------------------------
def load_captioner(folder: str | os.PathLike = TOY_CAPTIONER, device: str | torch.device = "cpu") -> Blip2OPT:
    """The shipped toy captioner (an HF folder written by ``blip2.export``), fp32, in eval mode."""
    return Blip2OPT.from_pretrained(folder, device=device).eval()


def _pixels(model: Blip2OPT, images: Sequence[Image.Image]) -> torch.Tensor:
    processor = Blip2ImageProcessor(model.image_size, model.image_mean, model.image_std)
    return processor(images).to(model.query_tokens.device)  # (B, 3, s, s)


def _batches(images: Sequence[Image.Image], batch_size: int) -> list[Sequence[Image.Image]]:
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected >= 1")
    return [images[i:i + batch_size] for i in range(0, len(images), batch_size)]


def caption_images(model: Blip2OPT, images: Sequence[Image.Image], batch_size: int = 64) -> list[str]:
    """One caption per image: greedy decoding from bos (``TOY_GENERATION``), as trained."""
    captions: list[str] = []
    for batch in _batches(images, batch_size):
        captions += model.generate(_pixels(model, batch), prompt=TOY_PROMPT or None, **TOY_GENERATION)
    return captions


@torch.no_grad()
def embed_images(model: Blip2OPT, images: Sequence[Image.Image], batch_size: int = 64) -> torch.Tensor:
    """[N, D_lm] unit image embeddings: the mean over the Q visual-prompt vectors, L2-normalised."""
    parts = [model.encode_image(_pixels(model, batch)).float().mean(dim=1) for batch in _batches(images, batch_size)]
    return F.normalize(torch.cat(parts), dim=-1)  # (N, D)


def caption_accuracy(model: Blip2OPT, split: str = "test", num: int = 200, seed: int = 0) -> dict[str, float]:
    """Attribute-level accuracy of the captions of ``num`` scenes of ``split``: ``exact`` (colour,
    shape and background all right, as read by ``parse_caption``) and each attribute's own rate."""
    scenes = [scene_of(split, seed, i) for i in range(num)]
    found = [parse_caption(c) for c in caption_images(model, [render(s, model.image_size) for s in scenes])]
    wanted = [{a: getattr(s, a) for a in ATTRIBUTES} for s in scenes]
    return {**attribute_scores(found, wanted), "num": num}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="The toy BLIP-2 captioner: its tokenizer and its accuracy.")
    sub = p.add_subparsers(dest="command", required=True)
    tok = sub.add_parser("tokenizer", help="train the caption tokenizer on the training captions")
    tok.add_argument("--out", default="models/toy/blip2-tokenizer")
    acc = sub.add_parser("accuracy", help="attribute-level caption accuracy on held-out scenes (JSON)")
    acc.add_argument("--model", default=str(TOY_CAPTIONER))
    acc.add_argument("--split", default="test")
    acc.add_argument("--num", type=int, default=200)
    acc.add_argument("--seed", type=int, default=0)
    opt = p.parse_args(argv)
    if opt.command == "tokenizer":
        print(f"{opt.out}: {len(train_tokenizer(opt.out))} tokens")
    else:
        print(json.dumps(caption_accuracy(load_captioner(opt.model), opt.split, opt.num, opt.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
