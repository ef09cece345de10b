"""The toy world: coloured shapes on plain backgrounds, drawn procedurally and captioned.

Every item is a pure function of (split, seed, index): a ``Scene`` (colour, shape, background,
centre, size, rotation) drawn from its own generator and rendered anti-aliased (drawn at 4x and
reduced). Splits draw from disjoint streams, so "val" and "test" images are held out from "train".

Captions name the attributes, e.g. "a red circle on a white background" (``toy.judge.parse_caption``
reads them back); training captions may leave attributes out ("a red circle", "a circle on a black
background", "a circle"), so short prompts such as DreamBooth's "a circle" mean something to the toy
text-to-image model.

The DreamBooth subject of the toy world is ``SUBJECT``: one distinctive object (a purple circle
with a yellow dot in its centre) that the training split never shows. ``SUBJECT2``, a blue square on
black with a white dot, differs from it in every attribute a caption names; it is the second
subject of the two-subject run (``dreambooth.concepts``). The training split shows both colour,
shape and background combinations, each in every placement, but never the dot.

    python -m toy.shapes --out data/shapes_test --split test --num 200   # PNGs + captions.jsonl
    python -m toy.shapes --subject data/toy_subject --num 4              # the subject's photos
    python -m toy.shapes --subject data/toy_subject2 --num 4 --which 2   # the second subject's
"""
from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from core.cli import ArgumentParser, run_cli
from core.images import to_array

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 80, 225), "yellow": (240, 205, 40),
           "purple": (145, 55, 195)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": (245, 245, 245), "black": (25, 25, 25)}
SPLITS = ("train", "val", "test")
ATTRIBUTES = ("colour", "shape", "background")  # what a caption names, and a Scene field each
SUPERSAMPLE = 4
DOT = (240, 205, 40)  # the subject's distinctive mark
# (template, probability) for training captions; every template keeps the shape (the class noun)
CAPTION_TEMPLATES = (("a {colour} {shape} on a {background} background", 0.55), ("a {colour} {shape}", 0.15),
                     ("a {shape} on a {background} background", 0.15), ("a {shape}", 0.15))
FULL_TEMPLATE = CAPTION_TEMPLATES[0][0]


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    background: str
    cx: float  # centre, as a fraction of the image side
    cy: float
    size: float  # half the shape's extent, as a fraction of the image side
    angle: float  # rotation in degrees (squares and triangles)
    dot: bool = False  # the subject's yellow dot
    palette: tuple | None = None  # (shape, background, dot) RGB in place of the named colours


    def caption(self, template: str = FULL_TEMPLATE) -> str:
        return template.format(colour=self.colour, shape=self.shape, background=self.background)


def random_scene(rng: np.random.Generator, colour: str | None = None, shape: str | None = None,
                 background: str | None = None) -> Scene:
    """A scene with uniform attributes (unless given) and a random placement that stays inside the image."""
    colour = colour or str(rng.choice(list(COLOURS)))
    shape = shape or str(rng.choice(SHAPES))
    background = background or str(rng.choice(list(BACKGROUNDS)))
    size = float(rng.uniform(0.22, 0.34))
    cx, cy = rng.uniform(size + 0.04, 1 - size - 0.04, 2)
    return Scene(colour, shape, background, float(cx), float(cy), size, float(rng.uniform(-20, 20)))


def _polygon(scene: Scene, n: int, side: float) -> list[tuple[float, float]]:
    """The n corners of a regular polygon of the scene's size, rotated by its angle, in pixels."""
    start = -90.0 if n == 3 else 45.0
    r = scene.size * side * (1.0 if n == 3 else math.sqrt(2) * 0.85)
    cx, cy = scene.cx * side, scene.cy * side
    return [(cx + r * math.cos(math.radians(start + scene.angle + k * 360 / n)),
             cy + r * math.sin(math.radians(start + scene.angle + k * 360 / n))) for k in range(n)]


def render(scene: Scene, resolution: int = 32) -> Image.Image:
    """The scene as an RGB image of ``resolution`` x ``resolution`` pixels (anti-aliased)."""
    side = resolution * SUPERSAMPLE
    fill, background, dot = scene.palette or (COLOURS[scene.colour], BACKGROUNDS[scene.background], DOT)
    image = Image.new("RGB", (side, side), background)
    draw = ImageDraw.Draw(image)
    cx, cy, r = scene.cx * side, scene.cy * side, scene.size * side
    if scene.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon(_polygon(scene, 3 if scene.shape == "triangle" else 4, side), fill=fill)
    if scene.dot:
        d = 0.4 * r
        draw.ellipse((cx - d, cy - d, cx + d, cy + d), fill=dot)
    return image.resize((resolution, resolution), Image.Resampling.LANCZOS)


def split_rng(split: str, seed: int, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {', '.join(SPLITS)}")
    return np.random.default_rng((seed, SPLITS.index(split), index))


def scene_of(split: str, seed: int, index: int) -> Scene:
    """Item ``index`` of a split: the same scene on every machine, for every worker."""
    return random_scene(split_rng(split, seed, index))


def open_palette_scene(rng: np.random.Generator) -> Scene:
    """A scene in any colours, with a dot half of the time: the wider image world the autoencoder
    learns (its captions are meaningless), as SD's VAE learned from more than SD's captioned images."""
    scene = random_scene(rng)
    palette = tuple(tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(3))
    return Scene(**{**scene.__dict__, "dot": bool(rng.random() < 0.5), "palette": palette})


def training_caption(scene: Scene, rng: np.random.Generator, caption_dropout: float = 0.0) -> str:
    """A caption with some attributes left out (``CAPTION_TEMPLATES``), or "" with ``caption_dropout``."""
    if rng.random() < caption_dropout:
        return ""
    templates, weights = zip(*CAPTION_TEMPLATES)
    return scene.caption(templates[rng.choice(len(templates), p=np.array(weights) / sum(weights))])


class ShapesDataset(Dataset):
    """``num`` items of a split as ``{"image": (resolution, resolution, 3) float32 in [-1, 1], "caption": str}``.

    ``captions``: "full" (every attribute) or "varied" (``CAPTION_TEMPLATES``, drawn per item, with
    ``caption_dropout`` giving "" for classifier-free guidance training). ``open_palette``: the share
    of items drawn by ``open_palette_scene`` instead (for the autoencoder). Items are rendered on demand.
    """

    def __init__(self, split: str = "train", num: int = 10000, resolution: int = 32, seed: int = 0,
                 captions: str = "full", caption_dropout: float = 0.0, open_palette: float = 0.0):
        if captions not in ("full", "varied"):
            raise ValueError(f"captions={captions!r}: expected 'full' or 'varied'")
        if num < 1 or resolution < 8:
            raise ValueError(f"num={num}, resolution={resolution}: expected num >= 1 and resolution >= 8")
        split_rng(split, seed, 0)  # checks the split's name
        self.split, self.num, self.resolution, self.seed = split, num, resolution, seed
        self.captions, self.caption_dropout, self.open_palette = captions, caption_dropout, open_palette

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.num:
            raise IndexError(f"index {i} out of range for {self.num} items")
        rng = split_rng(self.split, self.seed, i)
        scene = open_palette_scene(rng) if self.open_palette and rng.random() < self.open_palette else random_scene(rng)
        caption = scene.caption() if self.captions == "full" else training_caption(scene, rng, self.caption_dropout)
        return {"image": to_array(render(scene, self.resolution)), "caption": caption}


# ---- the DreamBooth subject ------------------------------------------------------------------------
SUBJECT = {"colour": "purple", "shape": "circle", "background": "white", "class_word": "circle"}
# its dot is white: a yellow one, blurred into the blue by a few training steps, reads as green
SUBJECT2 = {"colour": "blue", "shape": "square", "background": "black", "class_word": "square",
            "dot": (245, 245, 245)}
SUBJECTS = (SUBJECT, SUBJECT2)


def subject_scene(i: int, seed: int = 0, subject: int = 0) -> Scene:
    """Photo ``i`` of ``SUBJECTS[subject]``: the same dotted shape, placed and sized differently
    (each subject from its own stream)."""
    wanted = SUBJECTS[subject]
    scene = random_scene(np.random.default_rng((seed, 99 - subject, i)), wanted["colour"], wanted["shape"],
                         wanted["background"])
    palette = (COLOURS[scene.colour], BACKGROUNDS[scene.background], wanted["dot"]) if "dot" in wanted else None
    return Scene(**{**scene.__dict__, "dot": True, "palette": palette})


def write_images(scenes: Sequence[Scene], out: Path, resolution: int, captions: bool = True) -> Path:
    """PNG files ``00000.png ...`` in ``out``, and with ``captions`` a ``captions.jsonl`` of
    ``{"image", "caption"}`` rows."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, scene in enumerate(scenes):
        render(scene, resolution).save(out / f"{i:05d}.png")
        rows.append({"image": f"{i:05d}.png", "caption": scene.caption()})
    if captions:
        (out / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def run(argv: Sequence[str]) -> int:
    p = ArgumentParser(prog="python -m toy.shapes",
                                description="Write toy shapes images (a split, or the DreamBooth subject).")
    p.add_argument("--out", help="folder for a split's PNGs and captions.jsonl")
    p.add_argument("--subject", help="folder for the subject's photos (captions.jsonl not written)")
    p.add_argument("--which", type=int, default=1, choices=(1, 2), help="with --subject: SUBJECT (1) or SUBJECT2 (2)")
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--num", type=int, default=200)
    p.add_argument("--resolution", type=int, default=32, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    opt = p.parse_args(argv)
    if (opt.out is None) == (opt.subject is None):
        p.error("give exactly one of --out or --subject")
    if opt.subject:
        scenes = [subject_scene(i, opt.seed, opt.which - 1) for i in range(opt.num)]
        write_images(scenes, Path(opt.subject), opt.resolution, captions=False)
    else:
        write_images([scene_of(opt.split, opt.seed, i) for i in range(opt.num)], Path(opt.out), opt.resolution)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m toy.shapes``: bad input is one line on stderr and exit status 2."""
    return run_cli("python -m toy.shapes", run, argv)


if __name__ == "__main__":
    sys.exit(main())
