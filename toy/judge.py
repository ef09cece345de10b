"""Reading the toy world's images: the shipped toy BLIP-2 captioner (``toy.captioner``, trained by
configs/toy/vit.yaml then configs/toy/blip2.yaml, in models/toy/blip2) is the judge of generated images.

``caption_images`` names what an image shows ("a red circle on a white background"), ``parse_caption``
turns that into attributes and ``attribute_scores`` compares them with the wanted ones; ``embed_images``
gives unit image embeddings (the mean of the visual prompt, the Q query outputs projected into OPT's
width): the toy analog of CLIP-I / DINO similarity. Captioning decodes greedily from bos
(``TOY_GENERATION``), as trained, and stops at "\\n".

    python -m toy.judge accuracy --model models/toy/blip2 --split test --num 200
"""
from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from blip2 import Blip2OPT
from blip2.loading import load_blip2
from blip2.processors import Blip2ImageProcessor
from core.cli import ArgumentParser, run_cli
from toy import ROOT
from toy.shapes import ATTRIBUTES, BACKGROUNDS, COLOURS, SHAPES, render, scene_of

TOY_CAPTIONER = ROOT / "models" / "toy" / "blip2"
TOY_PROMPT = ""  # the training prompt (configs/toy/blip2.yaml); none: the caption follows bos
TOY_GENERATION = {"num_beams": 1, "max_new_tokens": 12, "min_new_tokens": 0}  # greedy


# ---- captions as attributes -----------------------------------------------------------------------
def attribute_scores(read: Sequence[dict], wanted: Sequence[dict]) -> dict[str, float]:
    """How often the attributes read (``parse_caption``) are the wanted ones: per attribute, and
    ``exact`` (all of ``ATTRIBUTES`` right at once)."""
    if len(read) != len(wanted) or not read:
        raise ValueError(f"attribute_scores: {len(read)} read and {len(wanted)} wanted, expected equal, > 0")
    hits = [{a: r[a] == w[a] for a in ATTRIBUTES} for r, w in zip(read, wanted)]
    return {"exact": sum(all(h.values()) for h in hits) / len(hits),
            **{a: sum(h[a] for h in hits) / len(hits) for a in ATTRIBUTES}}


def parse_caption(text: str) -> dict[str, str | None]:
    """The attributes a caption names: ``{"colour", "shape", "background"}`` (None where it names none;
    the background is the colour word right before "background", the colour the one before the shape)."""
    words = re.findall(r"[a-z]+", text.lower())
    found: dict[str, str | None] = {"colour": None, "shape": None, "background": None}
    for k, word in enumerate(words):
        if word in SHAPES and found["shape"] is None:
            found["shape"] = word
            if k > 0 and words[k - 1] in COLOURS:
                found["colour"] = words[k - 1]
        elif word == "background" and k > 0 and words[k - 1] in BACKGROUNDS:
            found["background"] = words[k - 1]
    return found


# ---- the captioner -------------------------------------------------------------------------------
def load_captioner(folder: str | os.PathLike = TOY_CAPTIONER, device: str | torch.device = "cpu") -> Blip2OPT:
    """The shipped toy captioner (an HF folder written by ``blip2.export``, or any source
    ``blip2.loading.load_blip2`` reads), fp32, in eval mode."""
    return load_blip2(folder, device=device)[0]


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


def run(argv: Sequence[str]) -> int:
    p = ArgumentParser(prog="python -m toy.judge",
                                description="The toy BLIP-2 captioner as a judge: its caption accuracy.")
    sub = p.add_subparsers(dest="command", required=True)
    acc = sub.add_parser("accuracy", help="attribute-level caption accuracy on held-out scenes (JSON)")
    acc.add_argument("--model", default=str(TOY_CAPTIONER))
    acc.add_argument("--split", default="test")
    acc.add_argument("--num", type=int, default=200)
    acc.add_argument("--seed", type=int, default=0)
    opt = p.parse_args(argv)
    print(json.dumps(caption_accuracy(load_captioner(opt.model), opt.split, opt.num, opt.seed)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m toy.judge``: bad input is one line on stderr and exit status 2."""
    return run_cli("python -m toy.judge", run, argv)


if __name__ == "__main__":
    sys.exit(main())
