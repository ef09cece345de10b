"""VQAv2-style evaluation data: images, questions and the human answers (10 in VQAv2).

Annotations: a JSON list (LAVIS's ``vqa_val_eval.json``) or JSONL of ``{"image": path, "question":
str, "answer": [str, ...]}`` (``answers`` is accepted too); relative paths from ``image_root``
(default: the file's folder). Questions are cleaned as LAVIS's ``BlipQuestionProcessor``; answers
stay raw (``blip2.metrics.vqa_accuracy`` normalises them as the official evaluation).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from blip2.data.augment import EvalTransform
from blip2.data.captions import load_json, jsonl_records
from core.images import load_rgb


def pre_question(question: str, max_words: int = 50) -> str:
    """LAVIS ``BlipQuestionProcessor``: lower-case, ``.!"()*#:;~`` removed, trailing spaces cut,
    at most ``max_words`` words."""
    question = re.sub(r"([.!\"()*#:;~])", "", question.lower()).rstrip(" ")
    return " ".join(question.split(" ")[:max_words])


def _record(rec: Any, i: int, root: Path, source: Path) -> dict[str, Any]:
    answers = rec.get("answer", rec.get("answers")) if isinstance(rec, dict) else None
    if not isinstance(answers, list) or not answers or "image" not in rec or "question" not in rec:
        raise ValueError(f"{source}: entry {i}: expected 'image', 'question' and a non-empty 'answer' list")
    return {"path": root / rec["image"], "question": str(rec["question"]), "answers": [str(a) for a in answers]}


class VQADataset(Dataset):
    """Items ``{"image": [3, s, s], "image_id", "question", "answers"}`` for ``Blip2OPTFinetune``'s validation."""

    def __init__(self, source: str, image_root: str | None = None, image_size: int = 224, max_words: int = 50):
        source = Path(source)
        if not source.is_file():
            raise ValueError(f"{source}: VQA annotations not found")
        records = jsonl_records(source) if source.suffix.lower() == ".jsonl" else load_json(source)
        if not isinstance(records, list) or not records:
            raise ValueError(f"{source}: expected a non-empty list of question records")
        root = Path(image_root) if image_root is not None else source.parent
        self.items = [_record(rec, i, root, source) for i, rec in enumerate(records)]
        missing = [it["path"] for it in self.items if not it["path"].is_file()]
        if missing:
            raise ValueError(f"{missing[0]}: image file not found ({len(missing)} missing, listed in {source})")
        self.transform, self.max_words = EvalTransform(image_size), max_words

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.items[i]
        return {"image": self.transform(load_rgb(item["path"])), "image_id": str(item["path"]),
                "question": pre_question(item["question"], self.max_words), "answers": item["answers"]}
