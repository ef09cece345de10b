"""The standard evaluation files, read into one list of ``Item`` in file order.

1. COCO Karpathy test: LAVIS's ``coco_karpathy_test.json`` (a list of ``{"image":
   "val2014/COCO_val2014_000000391895.jpg", "caption": [...]}``; the image id is the number ending
   the file name, as LAVIS takes it) or a file in the COCO captions format
   (``coco_karpathy_test_gt.json``, ``captions_val2014.json``: ``images`` with ``id`` and maybe
   ``file_name``, ``annotations`` with ``image_id`` and ``caption``).
2. NoCaps: ``nocaps_val_4500_captions.json``, the COCO captions format whose images also carry
   ``file_name`` and ``domain`` ("in-domain", "near-domain", "out-domain").
3. VQAv2 and OK-VQA: the VQA API's two files, questions (``questions``: ``question_id``,
   ``image_id``, ``question``; ``data_subtype`` e.g. "val2014") and annotations (``annotations``:
   ``question_id``, ``answers``: [{"answer"}], ``answer_type``).
4. GQA: ``testdev_balanced_questions.json``, the official object ``{questionId: {"imageId",
   "question", "answer", ...}}``, or LAVIS's list of ``{"question_id", "image", "question", "answer"}``.

COCO images without a ``file_name`` are found by the COCO name ``COCO_<subtype>_<id:012d>.jpg``,
in ``<images>/<subtype>/`` when that folder exists, else in ``<images>/`` itself. A missing field is
one line naming the file, the entry and the key.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Hashable

from blip2.data.captions import load_json

COCO_SUBTYPE = "val2014"  # the Karpathy test split and VQAv2 / OK-VQA val are COCO val2014 images


@dataclass(frozen=True)
class Item:
    """One thing to caption or answer. ``key``: its id in the official result file (image_id,
    question_id, GQA's questionId); ``references``: the reference captions or human answers;
    ``group``: the NoCaps domain or the VQA answer type."""

    key: Hashable
    image: Path
    references: tuple[str, ...]
    question: str | None = None
    group: str = ""


def read_file(path: str | os.PathLike, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: {what} not found")
    return load_json(path)


def field(record: Any, key: str, source: Path, where: str) -> Any:
    """``record[key]``, or one line naming the file, the entry and the missing key."""
    if not isinstance(record, dict):
        raise ValueError(f"{source}: {where}: expected an object, got {type(record).__name__}")
    if key not in record:
        raise ValueError(f"{source}: {where}: missing key {key!r}")
    return record[key]


def listed(obj: Any, key: str, source: Path) -> list:
    """The list ``obj[key]`` at the top of a file."""
    value = field(obj, key, source, "the top-level object")
    if not isinstance(value, list) or not value:
        raise ValueError(f"{source}: expected {key!r} to be a non-empty list")
    return value


def name_field(record: Any, key: str, source: Path, where: str) -> str:
    """A file name or id that names an image: a non-empty string."""
    value = field(record, key, source, where)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{source}: {where}: expected {key!r} to be a non-empty string, got {value!r}")
    return value


def int_field(record: Any, key: str, source: Path, where: str) -> int:
    """A COCO id: an integer."""
    value = field(record, key, source, where)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{source}: {where}: expected {key!r} to be an integer, got {value!r}")
    return value


def texts(value: Any, source: Path, where: str) -> tuple[str, ...]:
    """A caption or answer string, or a non-empty list of them."""
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str) for v in values):
        raise ValueError(f"{source}: {where}: expected a string or a non-empty list of strings, got {value!r}")
    return tuple(values)


def coco_image(images: Path, subtype: str, image_id: Any) -> Path:
    """The COCO file of an image id: ``COCO_<subtype>_<id:012d>.jpg`` (see the module notes)."""
    name = f"COCO_{subtype}_{int(image_id):012d}.jpg"
    return images / subtype / name if (images / subtype).is_dir() else images / name


def id_from_name(image: str) -> Hashable:
    """LAVIS's COCO image id: the number after the last ``_`` of the file name (else the stem)."""
    tail = Path(image).stem.split("_")[-1]
    return int(tail) if tail.isdigit() else Path(image).stem


def unique(items: list[Item], source: Path) -> list[Item]:
    counts = Counter(item.key for item in items)
    twice = [key for key, n in counts.items() if n > 1]
    if twice:
        raise ValueError(f"{source}: id {twice[0]!r} appears {counts[twice[0]]} times ({len(twice)} ids repeated)")
    return items


# ---- captions -----------------------------------------------------------------------------------
def lavis_caption_items(records: list, source: Path, images: Path) -> list[Item]:
    items = []
    for i, rec in enumerate(records):
        image = name_field(rec, "image", source, f"entry {i}")
        refs = texts(field(rec, "caption", source, f"entry {i}"), source, f"entry {i}: 'caption'")
        items.append(Item(id_from_name(image), images / image, refs))
    return items


def coco_caption_items(obj: Any, source: Path, images: Path, domains: bool = False) -> list[Item]:
    """Items of a COCO captions file; ``domains``: NoCaps, each image with ``file_name`` and ``domain``."""
    refs: dict[Hashable, list[str]] = {}
    for i, ann in enumerate(listed(obj, "annotations", source)):
        where = f"annotations[{i}]"
        image_id = field(ann, "image_id", source, where)
        refs.setdefault(image_id, []).extend(texts(field(ann, "caption", source, where), source, where))
    items = []
    for i, img in enumerate(listed(obj, "images", source)):
        where = f"images[{i}]"
        image_id = field(img, "id", source, where)
        if domains or "file_name" in img:
            path = images / name_field(img, "file_name", source, where)
        else:
            path = coco_image(images, COCO_SUBTYPE, int_field(img, "id", source, where))
        if image_id not in refs:
            raise ValueError(f"{source}: {where}: image id {image_id!r} has no caption in 'annotations'")
        group = str(field(img, "domain", source, where)) if domains else ""
        items.append(Item(image_id, path, tuple(refs.pop(image_id)), group=group))
    if refs:
        raise ValueError(f"{source}: 'annotations' name image id {next(iter(refs))!r}, which is not in 'images'")
    return items


def read_captions(path: str | os.PathLike, images: str | os.PathLike, domains: bool = False) -> list[Item]:
    """COCO Karpathy test (either format) or, with ``domains``, NoCaps (see the module notes)."""
    source, images = Path(path), Path(images)
    obj = read_file(source, "caption annotations")
    if isinstance(obj, list) and not domains:
        return unique(lavis_caption_items(obj, source, images), source)
    if isinstance(obj, dict):
        return unique(coco_caption_items(obj, source, images, domains), source)
    if domains:
        raise ValueError(f"{source}: expected the COCO captions format with a 'domain' for each image")
    raise ValueError(f"{source}: expected a list of {{'image', 'caption'}} or the COCO captions format")


# ---- VQA ----------------------------------------------------------------------------------------
def _answers(ann: Any, source: Path, where: str) -> tuple[str, ...]:
    answers = field(ann, "answers", source, where)
    if not isinstance(answers, list) or not answers:
        raise ValueError(f"{source}: {where}: expected 'answers' to be a non-empty list")
    return tuple(str(field(a, "answer", source, f"{where}.answers[{j}]")) for j, a in enumerate(answers))


def read_vqa(questions: str | os.PathLike, annotations: str | os.PathLike, images: str | os.PathLike) -> list[Item]:
    """VQAv2 / OK-VQA questions joined with their annotations (the VQA API's two files)."""
    q_source, a_source, images = Path(questions), Path(annotations), Path(images)
    q_obj, a_obj = read_file(q_source, "VQA questions"), read_file(a_source, "VQA annotations")
    truth = {}
    for i, ann in enumerate(listed(a_obj, "annotations", a_source)):
        where = f"annotations[{i}]"
        qid = field(ann, "question_id", a_source, where)
        truth[qid] = (_answers(ann, a_source, where), str(ann.get("answer_type", "")))
    subtype = str(q_obj.get("data_subtype", COCO_SUBTYPE)) if isinstance(q_obj, dict) else COCO_SUBTYPE
    items = []
    for i, q in enumerate(listed(q_obj, "questions", q_source)):
        where = f"questions[{i}]"
        qid, image_id = field(q, "question_id", q_source, where), int_field(q, "image_id", q_source, where)
        if qid not in truth:
            raise ValueError(f"{a_source}: no annotation for question_id {qid!r} ({q_source}: {where})")
        answers, answer_type = truth[qid]
        items.append(Item(qid, coco_image(images, subtype, image_id), answers,
                          str(field(q, "question", q_source, where)), answer_type))
    return unique(items, q_source)


def read_gqa(path: str | os.PathLike, images: str | os.PathLike) -> list[Item]:
    """GQA questions: the official object keyed by questionId, or LAVIS's list (module notes)."""
    source, images = Path(path), Path(images)
    obj = read_file(source, "GQA questions")
    items = []
    if isinstance(obj, dict):
        for qid, q in obj.items():
            where = f"question {qid!r}"
            image = images / f"{name_field(q, 'imageId', source, where)}.jpg"
            items.append(Item(str(qid), image, (str(field(q, "answer", source, where)),),
                              str(field(q, "question", source, where))))
    elif isinstance(obj, list):
        for i, q in enumerate(obj):
            where = f"entry {i}"
            image = images / name_field(q, "image", source, where)
            items.append(Item(str(field(q, "question_id", source, where)), image,
                              (str(field(q, "answer", source, where)),), str(field(q, "question", source, where))))
    else:
        raise ValueError(f"{source}: expected GQA's object of questions or LAVIS's list")
    if not items:
        raise ValueError(f"{source}: no questions in the file")
    return unique(items, source)


def check_images(items: list[Item], source: str | os.PathLike) -> None:
    """Every image must exist before any work starts: the first missing one is named."""
    paths = list(dict.fromkeys(item.image for item in items))
    missing = [path for path in paths if not path.is_file()]
    if missing:
        raise ValueError(f"{missing[0]}: image file not found ({len(missing)} of {len(paths)} images missing, "
                         f"listed in {source})")
