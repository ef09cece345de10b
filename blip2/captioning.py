"""The pieces of ``scripts/caption.py`` (the model comes from ``blip2.loading.load_blip2``): collecting
images, loading a batch that may hold bad files, captioning or answering a batch, and writing
records (JSONL / CSV) and sidecars."""
from __future__ import annotations

import contextlib
import csv
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from PIL import Image

from blip2.modules.blip2_opt import VQA_TEMPLATE, Blip2OPT
from core.images import ImageLoadError, is_image_file, list_images, load_rgb
from core.weights import atomic_path


def _read_lines(path: Path, what: str) -> list[str]:
    """Non-empty lines of a text file, without ``#`` comment lines."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: neither an image (by extension) nor a UTF-8 {what}") from None
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def _expand(path: Path) -> list[Path]:
    """A folder -> its images (recursive); an image file -> itself; any other file -> its list."""
    if path.is_dir():
        return list_images(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such image, folder or list file")
    if is_image_file(path):
        return [path]
    entries = [Path(line) for line in _read_lines(path, "list file (one image path a line)")]
    return [entry if entry.is_absolute() else path.parent / entry for entry in entries]


def collect_inputs(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Image paths from files, folders (recursive, by extension) and list files, in order, once each.

    A missing path is an error; the entries of a list file (relative to its folder) are not
    checked here, so a missing one is reported when its batch loads.
    """
    found: dict[Path, None] = {}
    for path in paths:
        found.update(dict.fromkeys(_expand(Path(path))))
    if not found:
        raise ValueError(f"no images found in {', '.join(map(str, paths))}")
    return list(found)


def read_questions(question: str | None, questions_file: str | os.PathLike | None) -> list[str]:
    """The VQA questions: ``--question`` and/or the lines of ``--questions FILE`` (empty: captioning)."""
    questions = [question] if question else []
    if questions_file is not None:
        path = Path(questions_file)
        if not path.is_file():
            raise ValueError(f"{path}: questions file not found")
        lines = _read_lines(path, "questions file")
        if not lines:
            raise ValueError(f"{path}: no questions in the file")
        questions += lines
    return questions


def load_batch(paths: Sequence[Path]) -> tuple[list[Path], list[Image.Image], list[str]]:
    """Load what can be loaded: (good paths, their RGB images, one error line per bad file)."""
    good, images, errors = [], [], []
    for path in paths:
        try:
            images.append(load_rgb(path))
            good.append(path)
        except ImageLoadError as err:
            errors.append(str(err))
    return good, images, errors


def batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """Consecutive chunks of ``size`` items (the last may be shorter)."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _group(texts: list[str], count: int) -> list[list[str]]:
    """``generate``'s flat [B * n] strings -> B lists of n (``num_return_sequences``)."""
    per = len(texts) // count
    return [texts[i * per:(i + 1) * per] for i in range(count)]


@torch.no_grad()
def describe(model: Blip2OPT, pixel_values: torch.Tensor, prompt: str | None, questions: Sequence[str],
             template: str = VQA_TEMPLATE, **gen: Any) -> list[tuple[str, str, list[list[str]]]]:
    """Caption (no questions) or answer each question for a batch: a (kind, text, outputs) triple
    per task, ``outputs`` holding one list of generated strings per image."""
    count = pixel_values.shape[0]
    if not questions:
        return [("prompt", prompt or "", _group(model.generate(pixel_values, prompt=prompt, **gen), count))]
    return [("question", q, _group(model.answer(pixel_values, [q] * count, template=template, **gen), count))
            for q in questions]


def records(paths: Sequence[Path], tasks: Sequence[tuple[str, str, list[list[str]]]]) -> Iterator[dict[str, str]]:
    """One record per image, task and returned sequence: image, prompt/question, caption/answer."""
    for kind, text, outputs in tasks:
        answer_key = "caption" if kind == "prompt" else "answer"
        for path, texts in zip(paths, outputs):
            for out in texts:
                yield {"image": str(path), kind: text, answer_key: out}


@contextlib.contextmanager
def record_writer(path: str | os.PathLike, fields: Sequence[str]) -> Iterator[Callable[[Mapping[str, str]], Any]]:
    """Yield ``write(record)`` streaming into ``path``: JSONL, or CSV (header ``fields``) when the
    name ends in ``.csv``. The file appears, complete, only when the block exits without error."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        if path.suffix.lower() == ".csv":
            writer = csv.DictWriter(f, fieldnames=list(fields))
            writer.writeheader()
            yield writer.writerow
        else:
            yield lambda record: f.write(json.dumps(record, ensure_ascii=False) + "\n")


def check_sidecars(images: Sequence[Path], overwrite: bool = False) -> None:
    """Before any work: no two images share a sidecar (``x.png`` and ``x.jpg`` both write ``x.txt``),
    and no sidecar that exists (a hand-written caption) is replaced unless ``overwrite``."""
    owners: dict[Path, Path] = {}
    for image in images:
        sidecar = image.with_suffix(".txt")
        if sidecar in owners:
            raise ValueError(f"--sidecar: {owners[sidecar]} and {image} would both write {sidecar} (rename one)")
        owners[sidecar] = image
    existing = [p for p in owners if p.exists()]
    if existing and not overwrite:
        raise ValueError(f"--sidecar: {existing[0]} exists ({len(existing)} of the captions files do); pass "
                         "--overwrite to replace them")


def write_sidecar(image: Path, captions: Sequence[str]) -> Path:
    """Write ``<image stem>.txt`` next to the image (one caption a line), atomically."""
    path = image.with_suffix(".txt")
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(captions) + "\n", encoding="utf-8")
    return path
