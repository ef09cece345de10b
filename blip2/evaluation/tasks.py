"""The paper's evaluations (BLIP-2, arXiv 2301.12597, Tables 2 and 3): what each task reads, how it
prompts and decodes (LAVIS's settings: ``lavis/projects/blip2/eval/*.yaml``), what result file it
writes and how that is scored. Scores are in percent, as the paper's tables give them.

- coco: the COCO fine-tuned model, "a photo of", beam 5, 8 to 30 new tokens; BLEU-4 and CIDEr.
- nocaps: as coco (the paper applies the COCO model zero-shot); CIDEr overall and in, near and
  out of domain.
- vqav2, okvqa: the pre-trained model zero-shot, "Question: {} Short answer:", beam 5, length
  penalty -1, 1 to 10 new tokens; VQA accuracy against the 10 human answers.
- gqa: as VQA; exact match.

METEOR and SPICE, which coco-caption also reports, run in Java and are left out. VQA questions are
cleaned as LAVIS's ``BlipQuestionProcessor`` before they go into the template.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable, Mapping

from blip2.evaluation.annotations import Item, read_captions, read_gqa, read_vqa
from blip2.metrics import caption_scores, domain_scores, gqa_accuracy, lavis_vqa_accuracy, vqa_accuracy

CAPTION_PROMPT = "a photo of"
SHORT_ANSWER = "Question: {} Short answer:"
CAPTION_GENERATION = {"num_beams": 5, "max_new_tokens": 30, "min_new_tokens": 8}
VQA_GENERATION = {"num_beams": 5, "max_new_tokens": 10, "min_new_tokens": 1, "length_penalty": -1.0}
Outputs = Mapping[Hashable, str]


def _mean(values: list[float]) -> float:
    return 100.0 * sum(values) / len(values)


def score_coco(items: list[Item], outputs: Outputs) -> dict[str, Any]:
    scores = caption_scores({it.key: outputs[it.key] for it in items}, {it.key: it.references for it in items})
    return {"bleu4": 100.0 * scores["bleu4"], "cider": 100.0 * scores["cider"]}


def score_nocaps(items: list[Item], outputs: Outputs) -> dict[str, Any]:
    scores = domain_scores({it.key: outputs[it.key] for it in items}, {it.key: it.references for it in items},
                           {it.key: it.group for it in items})
    overall = scores.pop("overall")
    return {"cider": 100.0 * overall["cider"], **{f"cider_{d}": 100.0 * s["cider"] for d, s in scores.items()},
            "bleu4": 100.0 * overall["bleu4"]}


def score_vqa(items: list[Item], outputs: Outputs) -> dict[str, Any]:
    """Official VQA accuracy, overall and per answer type, and LAVIS's variant (the paper's)."""
    official = {it.key: vqa_accuracy(outputs[it.key], it.references) for it in items}
    types = sorted({it.group for it in items})
    return {"accuracy": _mean(list(official.values())),
            "accuracy_lavis": _mean([lavis_vqa_accuracy(outputs[it.key], it.references) for it in items]),
            "accuracy_per_answer_type": {t: _mean([official[it.key] for it in items if it.group == t]) for t in types}}


def score_gqa(items: list[Item], outputs: Outputs) -> dict[str, Any]:
    return {"accuracy": _mean([gqa_accuracy(outputs[it.key], it.references[0]) for it in items])}


@dataclass(frozen=True)
class Task:
    """``kind``: "caption" (``prompt`` is the caption prefix) or "vqa" (``prompt`` is the template);
    ``result_fields``: the id and text fields of the official result file."""

    name: str
    kind: str
    prompt: str
    generation: Mapping[str, Any]
    result_fields: tuple[str, str]
    score: Callable[[list[Item], Outputs], dict[str, Any]]

    def read(self, annotations: str, images: str, questions: str | None = None) -> list[Item]:
        if self.kind == "vqa" and self.name != "gqa":
            if questions is None:
                raise ValueError(f"{self.name}: give the questions file (--questions) with the annotations file")
            return read_vqa(questions, annotations, images)
        if questions is not None:
            raise ValueError(f"{self.name}: --questions is for vqav2 / okvqa; the questions are in {annotations}")
        if self.name == "gqa":
            return read_gqa(annotations, images)
        return read_captions(annotations, images, domains=self.name == "nocaps")

    def records(self, items: list[Item], outputs: Outputs) -> list[dict[str, Any]]:
        """The official result file: one record per item, in the annotation file's order."""
        id_field, text_field = self.result_fields
        return [{id_field: it.key, text_field: outputs[it.key]} for it in items]


TASKS = {
    "coco": Task("coco", "caption", CAPTION_PROMPT, CAPTION_GENERATION, ("image_id", "caption"), score_coco),
    "nocaps": Task("nocaps", "caption", CAPTION_PROMPT, CAPTION_GENERATION, ("image_id", "caption"), score_nocaps),
    "vqav2": Task("vqav2", "vqa", SHORT_ANSWER, VQA_GENERATION, ("question_id", "answer"), score_vqa),
    "okvqa": Task("okvqa", "vqa", SHORT_ANSWER, VQA_GENERATION, ("question_id", "answer"), score_vqa),
    "gqa": Task("gqa", "vqa", SHORT_ANSWER, VQA_GENERATION, ("questionId", "prediction"), score_gqa),
}
