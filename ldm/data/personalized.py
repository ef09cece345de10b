"""DreamBooth data: instance images of the subject and class images for prior preservation.

Ruiz et al., "DreamBooth" (arXiv 2208.12242), Sec. 3.2-3.3: the subject's 3-5 images are
captioned "a [identifier] [class noun]", and the class-specific prior-preservation loss pairs
each of them with a class image captioned "a [class noun]". Items are CompVis-style dicts
``{"image": (H, W, 3) float32 in [-1, 1], "caption": str, "image_digest": str}`` that
``LatentDiffusion`` reads with ``first_stage_key="image"`` and ``cond_stage_key="caption"``; torch's
``default_collate`` batches them (and the nested :class:`DreamBoothPairs` dicts) as stacked tensors
and lists of strings. ``image_digest`` is ``core.images.image_digest`` of the item's final uint8
pixels, computed here in the loader's workers: DreamBooth's ``cache_latents`` finds its entries by
it, so a data set (or a wrapper) that sets ``<first_stage_key>_digest`` must digest exactly the
pixels it returns.

Per item ``i``:

1. ``load_rgb`` decodes image ``i % num_images`` (EXIF orientation applied, RGB).
2. The largest centered (or random) square is cropped, never stretched, and resized to
   ``resolution x resolution``.
3. It is flipped horizontally with probability ``flip_p``.
4. The caption is the image's sidecar ``<stem>.txt`` (optional) or one of the templates.

The random draws of steps 2-4 come from ``numpy.random.default_rng((seed, set, class_images, i))``, so an
item depends only on its index: a run resumed mid-epoch sees exactly the same items.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from core.images import (
    image_digest,
    is_image_file,
    list_images,
    load_rgb,
    to_array,
    visible_files,
)

INSTANCE_TEMPLATE = "a photo of {identifier} {class_word}"
CLASS_TEMPLATE = "a photo of {class_word}"
CROPS = ("center", "random")
SETS = ("train", "val")
INTERPOLATIONS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                  "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
                  "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}
MAX_LISTED = 10
MAX_UPSCALE = 4  # a smaller image is refused: its short side times this must reach the resolution


def fill_template(template: str, identifier: str | None, class_word: str | None) -> str:
    """Replace ``{identifier}`` and ``{class_word}`` (a missing one by nothing) and squeeze the spaces."""
    text = template.replace("{identifier}", identifier or "").replace("{class_word}", class_word or "")
    return " ".join(text.split())


def square_box(width: int, height: int, crop: str, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """The largest square inside ``width x height``: centered, or at a position drawn from ``rng``."""
    side = min(width, height)
    if crop == "center":
        left, top = (width - side) // 2, (height - side) // 2
    else:
        left, top = int(rng.integers(width - side + 1)), int(rng.integers(height - side + 1))
    return left, top, left + side, top + side


def _listing(paths: Sequence[Path], root: Path) -> str:
    """``a.txt, b/c.md`` (relative to ``root``), at most MAX_LISTED names then a count."""
    names = [p.relative_to(root).as_posix() for p in paths]
    more = f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
    return ", ".join(names[:MAX_LISTED]) + more


def _other_files(root: Path, expected: frozenset[Path]) -> list[Path]:
    """Visible files under ``root`` (hidden names skipped, as ``list_images`` does) that are
    neither images nor in ``expected``."""
    return sorted(p for p in visible_files(root) if not is_image_file(p) and p not in expected)


def read_sidecar(path: Path) -> str | None:
    """The caption in ``path`` on one line, or None when there is no such file."""
    if not path.is_file():
        return None
    try:
        text = " ".join(path.read_text(encoding="utf-8").split())
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot read the caption sidecar ({type(err).__name__}: {err})") from None
    if not text:
        raise ValueError(f"{path}: caption sidecar is empty (expected one line of text)")
    return text


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(choices)}")


def _check_numbers(resolution: int, repeats: int, flip_p: float, seed: int) -> None:
    if resolution < 1 or repeats < 1:
        raise ValueError(f"resolution={resolution}, repeats={repeats}: expected positive integers")
    if not 0.0 <= flip_p <= 1.0:
        raise ValueError(f"flip_p={flip_p}: expected a probability in [0, 1]")
    if seed < 0:
        raise ValueError(f"seed={seed}: expected a non-negative integer")


class PersonalizedBase(Dataset):
    """Instance images (``class_images=False``) or class images (``class_images=True``) of one folder,
    as dicts ``{"image": (resolution, resolution, 3) float32 in [-1, 1], "caption": str,
    "image_digest": str}``;
    ``len = num_images * repeats``.

    Captions: a ``templates`` entry (drawn per item) with ``{identifier}`` and ``{class_word}`` filled;
    defaults "a photo of {identifier} {class_word}" (instance) and "a photo of {class_word}" (class;
    a given template's ``{identifier}`` is dropped there). With ``caption_sidecars``, ``<stem>.txt``
    beside an image, when present, is that image's caption (placeholders filled the same way).
    ``set`` ("train" | "val") keys the random stream, so a val set of the same folder draws other
    augmentations. All images are decoded once here, so a bad file fails now, by name.
    """

    def __init__(self, data_root: str, resolution: int = 512, repeats: int = 100, flip_p: float = 0.5,
                 set: str = "train", identifier: str = "sks", class_word: str | None = None,
                 class_images: bool = False, templates: Sequence[str] | None = None, crop: str = "center",
                 caption_sidecars: bool = False, interpolation: str = "bicubic", seed: int = 0) -> None:
        _check_choice("set", set, SETS)
        _check_choice("crop", crop, CROPS)
        _check_choice("interpolation", interpolation, tuple(INTERPOLATIONS))
        _check_numbers(resolution, repeats, flip_p, seed)
        self.root = Path(data_root)
        self.resolution, self.repeats, self.flip_p, self.set, self.crop = resolution, repeats, flip_p, set, crop
        self.identifier = None if class_images else identifier
        self.class_word, self.class_images, self.seed = class_word, class_images, seed
        self.resample = INTERPOLATIONS[interpolation]
        self.templates = self._templates(templates)
        self.paths = self._find_images()
        self.sidecars = [read_sidecar(p.with_suffix(".txt")) if caption_sidecars else None for p in self.paths]
        self._warn_skipped(caption_sidecars)
        self._check_class_word()
        self.sizes = [load_rgb(p).size for p in self.paths]  # (W, H) after EXIF orientation
        self._warn_small()

    def _templates(self, templates: Sequence[str] | None) -> tuple[str, ...]:
        if templates is None:
            return (CLASS_TEMPLATE if self.class_images else INSTANCE_TEMPLATE,)
        if isinstance(templates, str) or not templates:
            raise ValueError(f"templates={templates!r}: expected a non-empty list of caption templates")
        return tuple(templates)

    def _find_images(self) -> list[Path]:
        if not self.root.is_dir():
            raise ValueError(f"{self.root}: data_root not found (expected a folder of images)")
        paths = list_images(self.root)
        if not paths:
            raise ValueError(f"{self.root}: data_root holds no images (expected files ending in .jpg, .png, ...)")
        return paths

    def _warn_skipped(self, caption_sidecars: bool) -> None:
        sidecars = frozenset(p.with_suffix(".txt") for p in self.paths) if caption_sidecars else frozenset()
        skipped = _other_files(self.root, sidecars)
        if skipped:
            warnings.warn(f"{self.root}: skipping {len(skipped)} files that are not images: "
                          f"{_listing(skipped, self.root)}", stacklevel=3)

    def _check_class_word(self) -> None:
        uncaptioned = [p for p, text in zip(self.paths, self.sidecars) if text is None]
        if self.class_images and self.class_word is None and uncaptioned:
            raise ValueError(f"{self.root}: class images need --class_word (class_word) for their captions; "
                             f"{len(uncaptioned)} images have no caption sidecar, e.g. {uncaptioned[0].name}")

    def _warn_small(self) -> None:
        tiny = [(p, w, h) for p, (w, h) in zip(self.paths, self.sizes) if min(w, h) * MAX_UPSCALE < self.resolution]
        if tiny:
            p, w, h = tiny[0]
            raise ValueError(f"{p}: {w}x{h} pixels, too small for resolution={self.resolution} (at least "
                             f"{-(-self.resolution // MAX_UPSCALE)} px a side: more than {MAX_UPSCALE}x upscaling "
                             f"trains on blur); {len(tiny)} such images in {self.root}")
        small = [p for p, (w, h) in zip(self.paths, self.sizes) if min(w, h) < self.resolution]
        if small:
            warnings.warn(f"{self.root}: {len(small)} images are smaller than resolution={self.resolution} and "
                          f"will be upscaled: {_listing(small, self.root)}", stacklevel=3)

    def __len__(self) -> int:
        return len(self.paths) * self.repeats

    def rng(self, i: int) -> np.random.Generator:
        """The item's own generator: a function of (seed, set, class_images, i) only, never of global state."""
        return np.random.default_rng((self.seed, SETS.index(self.set), int(self.class_images), i))

    def caption(self, n: int, template: str) -> str:
        """Image ``n``'s sidecar caption when it has one, else ``template``, placeholders filled."""
        return fill_template(self.sidecars[n] or template, self.identifier, self.class_word)

    def __getitem__(self, i: int) -> dict[str, np.ndarray | str]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        i %= len(self)
        n, rng = i % len(self.paths), self.rng(i)
        flip = rng.random() < self.flip_p  # fixed draw order: flip, template, crop
        template = self.templates[rng.integers(len(self.templates))]
        image = load_rgb(self.paths[n])
        box = square_box(*image.size, self.crop, rng)
        image = image.crop(box).resize((self.resolution, self.resolution), self.resample)
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = np.asarray(image)  # (res, res, 3) uint8
        return {"image": to_array(image), "caption": self.caption(n, template), "image_digest": image_digest(pixels)}


class DreamBoothPairs(Dataset):
    """Each instance item with a class item for the prior-preservation loss (DreamBooth Eq. 2):
    ``{"instance": instance[i], "class": class_images[i % len(class_images)]}``, or
    ``{"instance": ...}`` without class images; ``len = len(instance)``."""

    def __init__(self, instance: Dataset, class_images: Dataset | None = None) -> None:
        if class_images is not None and len(class_images) == 0:
            raise ValueError("DreamBoothPairs: the class-image data set is empty")
        self.instance, self.class_images = instance, class_images

    def __len__(self) -> int:
        return len(self.instance)

    def __getitem__(self, i: int) -> dict[str, dict]:
        item = {"instance": self.instance[i]}
        if self.class_images is not None:
            item["class"] = self.class_images[i % len(self.class_images)]
        return item
