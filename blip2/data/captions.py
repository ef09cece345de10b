"""Image-caption data sets for BLIP-2 training and caption evaluation.

Sources (``read_captions``), each giving (image path, caption) pairs:
- Karpathy-split JSON (``dataset_coco.json``): ``{"images": [{"filepath", "filename", "split",
  "sentences": [{"raw"}]}]}``; ``split`` picks entries (Karpathy's "train" is usually taken with
  "restval", as LAVIS's ``coco_karpathy_train.json``).
- LAVIS JSON: ``[{"image": path, "caption": str or [str, ...]}]``.
- CSV (header with ``image`` and ``caption``) or JSONL (objects with those keys).
- A folder of images, each with a ``.txt`` sidecar holding its captions, one a line.
Relative image paths are taken from ``image_root`` (default: the annotation file's folder).

``CaptionDataset`` in ``train`` mode yields one item per caption: ``{"image": [3, s, s],
"text_input": caption}``, the image augmented (``TrainTransform``) and the caption cleaned as LAVIS's
``BlipCaptionProcessor``. Its augmentation draws come from a generator seeded with ``(seed, index)``,
where the sampler numbers items by epoch (``core.data.sampler``, ``epoch_indexed``: index
``e * n + i`` is item ``i`` in epoch ``e``), so they are the same in a resumed run and for any
number of workers; in ``eval`` mode one item per image: ``{"image", "image_id", "references"}``
with the raw captions (coco-caption scores raw text). Images are read with ``core.images.load_rgb``,
so a bad file fails by name.
"""
from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from blip2.data.augment import EvalTransform, TrainTransform
from blip2.processors import CLIP_MEAN, CLIP_STD
from core.images import list_images, load_rgb

Pair = tuple[Path, str]
MODES = ("train", "eval")


def pre_caption(caption: str, max_words: int = 50) -> str:
    """LAVIS ``BlipCaptionProcessor.pre_caption``: lower-case, ``.!"()*#:;~`` -> space, spaces
    collapsed, stripped, at most ``max_words`` words."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    return " ".join(caption.split(" ")[:max_words])


def load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: expected a non-empty caption string, got {value!r}")
    return value


def karpathy_pairs(obj: dict, root: Path, source: Path, split: Sequence[str] | None) -> list[Pair]:
    """Pairs of the Karpathy-split JSON entries whose ``split`` is in ``split`` (all when None)."""
    pairs = []
    for i, entry in enumerate(obj["images"]):
        if split is not None and entry.get("split") not in split:
            continue
        try:
            path = root / entry.get("filepath", "") / entry["filename"]
            pairs += [(path, _text(s["raw"], f"{source}: images[{i}].sentences")) for s in entry["sentences"]]
        except (KeyError, TypeError):
            raise ValueError(f"{source}: images[{i}]: expected 'filename' and 'sentences': [{{'raw': ...}}]") from None
    return pairs


def record_pairs(records: Iterable[Any], root: Path, source: Path) -> list[Pair]:
    """Pairs of ``{"image", "caption"}`` records; ``caption`` may be a list of captions."""
    pairs = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or "image" not in rec or "caption" not in rec:
            raise ValueError(f"{source}: entry {i}: expected the keys 'image' and 'caption'")
        captions = rec["caption"] if isinstance(rec["caption"], list) else [rec["caption"]]
        pairs += [(root / rec["image"], _text(c, f"{source}: entry {i}")) for c in captions]
    return pairs


def jsonl_records(path: Path) -> list[Any]:
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: line {n} is not valid JSON ({err})") from None
    return records


def csv_records(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not {"image", "caption"} <= set(reader.fieldnames or []):
            raise ValueError(f"{path}: expected a header with 'image' and 'caption' columns, got {reader.fieldnames}")
        return list(reader)


def sidecar_pairs(folder: Path) -> list[Pair]:
    """Each image of ``folder`` (recursive) with the lines of its ``.txt`` sidecar."""
    pairs, missing = [], []
    for image in list_images(folder):
        sidecar = image.with_suffix(".txt")
        if not sidecar.is_file():
            missing.append(image)
            continue
        lines = [ln.strip() for ln in sidecar.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not lines:
            raise ValueError(f"{sidecar}: the caption sidecar is empty")
        pairs += [(image, line) for line in lines]
    if missing:
        raise ValueError(f"{missing[0]}: no caption sidecar {missing[0].with_suffix('.txt').name} "
                         f"({len(missing)} images without one)")
    return pairs


def read_captions(source: str | os.PathLike, image_root: str | os.PathLike | None = None,
                  split: str | Sequence[str] | None = None) -> list[Pair]:
    """(image path, raw caption) pairs from any supported source (see the module notes)."""
    source = Path(source)
    if source.is_dir():
        return sidecar_pairs(source)
    if not source.is_file():
        raise ValueError(f"{source}: caption annotations not found (expected a file or a folder)")
    root = Path(image_root) if image_root is not None else source.parent
    suffix = source.suffix.lower()
    if suffix == ".csv":
        return record_pairs(csv_records(source), root, source)
    if suffix == ".jsonl":
        return record_pairs(jsonl_records(source), root, source)
    if suffix != ".json":
        raise ValueError(f"{source}: unknown annotation format (expected .json, .jsonl, .csv or a folder)")
    obj = load_json(source)
    if isinstance(obj, dict) and "images" in obj:
        return karpathy_pairs(obj, root, source, [split] if isinstance(split, str) else split)
    if isinstance(obj, list):
        return record_pairs(obj, root, source)
    raise ValueError(f"{source}: expected a Karpathy-split object with 'images' or a list of records")


def group_by_image(pairs: Sequence[Pair]) -> dict[Path, list[str]]:
    """Captions of each image, images in first-seen order."""
    groups: dict[Path, list[str]] = {}
    for path, caption in pairs:
        groups.setdefault(path, []).append(caption)
    return groups


class CaptionDataset(Dataset):
    """Captions of one source for training (one item per caption) or evaluation (one per image)."""

    def __init__(self, source: str, image_root: str | None = None, split: str | Sequence[str] | None = None,
                 mode: str = "train", image_size: int = 224, min_scale: float = 0.5, max_scale: float = 1.0,
                 max_words: int = 50, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                 seed: int = 0):
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: expected one of {MODES}")
        pairs = read_captions(source, image_root, split)
        if not pairs:
            raise ValueError(f"{source}: no captions" + (f" in split {split!r}" if split is not None else ""))
        self.mode, self.max_words, self.seed = mode, max_words, seed
        self.epoch_indexed = mode == "train"  # indices e * n + i seed the augmentation (module notes)
        self.groups = group_by_image(pairs)
        missing = [p for p in self.groups if not p.is_file()]
        if missing:
            raise ValueError(f"{missing[0]}: image file not found ({len(missing)} of {len(self.groups)} missing, "
                             f"listed in {source})")
        self.items = pairs if mode == "train" else list(self.groups.items())
        self.transform = (TrainTransform(image_size, min_scale, max_scale, mean=mean, std=std) if mode == "train"
                          else EvalTransform(image_size, mean, std))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path, text = self.items[i % len(self.items)]
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence((self.seed, i)).generate_state(1)[0]))
        image = self.transform(load_rgb(path), gen)  # (3, s, s)
        if self.mode == "train":
            return {"image": image, "text_input": pre_caption(text, self.max_words)}
        return {"image": image, "image_id": str(path), "references": list(text)}


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack the images; keep every other field as a list (captions, ids, reference lists)."""
    batch: dict[str, Any] = {"image": torch.stack([it["image"] for it in items])}
    for key in items[0]:
        if key != "image":
            batch[key] = [it[key] for it in items]
    return batch
