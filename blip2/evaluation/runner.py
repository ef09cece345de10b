"""Run a task: generate what is not yet in the partial file, batch by batch, then write the
official result file and the scores.

Images are decoded by ``core.images.load_rgb`` and preprocessed in ``num_workers`` DataLoader
workers while the model generates; each finished batch goes into the partial file at once, so a
crash loses at most the batch in flight, and a restart skips everything already there.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Hashable, Mapping, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from blip2.data.vqa import pre_question
from blip2.evaluation.annotations import Item
from blip2.evaluation.partial import PartialResults
from blip2.evaluation.tasks import Task
from blip2.modules.blip2_opt import Blip2OPT
from core.images import load_rgb
from core.weights import atomic_path


class PendingImages(Dataset):
    """(key, question or "", pixels [3, s, s]) of the items still to do."""

    def __init__(self, items: Sequence[Item], processor: Callable[[list], torch.Tensor]):
        self.items, self.processor = list(items), processor

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Hashable, str, torch.Tensor]:
        item = self.items[i]
        return item.key, item.question or "", self.processor([load_rgb(item.image)])[0]


def collate(batch: list[tuple[Hashable, str, torch.Tensor]]) -> tuple[list, list[str], torch.Tensor]:
    keys, questions, pixels = zip(*batch)
    return list(keys), list(questions), torch.stack(pixels)  # (B, 3, s, s)


@torch.no_grad()
def outputs_of_batch(model: Blip2OPT, task: Task, questions: list[str], pixels: torch.Tensor,
                     generation: Mapping[str, Any]) -> list[str]:
    """One text per image: a caption after the task's prompt, or the answer to its question."""
    if task.kind == "caption":
        return model.generate(pixels, prompt=task.prompt, **generation)
    return model.answer(pixels, [pre_question(q) for q in questions], template=task.prompt, **generation)


def generate_missing(model: Blip2OPT, processor: Callable, task: Task, items: Sequence[Item],
                     results: PartialResults, generation: Mapping[str, Any], batch_size: int = 16,
                     num_workers: int = 4, device: str | torch.device = "cpu") -> int:
    """Generate every item not in ``results.done``; returns how many were generated now."""
    pending = [item for item in items if item.key not in results.done]
    loader = DataLoader(PendingImages(pending, processor), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=collate)
    with tqdm(total=len(items), initial=len(items) - len(pending), unit="img" if task.kind == "caption" else "question",
              desc=task.name) as bar:
        for keys, questions, pixels in loader:
            texts = outputs_of_batch(model, task, questions, pixels.to(device), generation)
            results.append(zip(keys, texts))
            bar.update(len(keys))
    return len(pending)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return path
