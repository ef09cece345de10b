r"""The BLIP-2 paper's evaluations on the standard files: COCO Karpathy test and NoCaps val captioning,
VQAv2 val, OK-VQA and GQA test-dev zero-shot VQA (``blip2.evaluation.tasks`` lists the settings).

    python scripts/evaluate_blip2.py coco --model models/blip2-opt-2.7b-coco \
        --annotations coco/annotations/coco_karpathy_test.json --images coco/images --out eval/coco
    python scripts/evaluate_blip2.py vqav2 --model models/blip2-opt-2.7b --images coco/images \
        --questions v2_OpenEnded_mscoco_val2014_questions.json \
        --annotations v2_mscoco_val2014_annotations.json --out eval/vqav2

Writes into ``--out``: ``results.json`` (the official result format), ``metrics.json`` (scores in
percent, with the settings) and ``results.partial.jsonl``, the results so far: a run that stops
continues where it was when started again with the same command, and one with another model,
annotation file or settings is refused (``--overwrite`` discards the old results). Bad input
(a missing field, a missing image) is one line on stderr and exit status 2, before any work starts.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from blip2.evaluation.annotations import check_images
from blip2.evaluation.partial import PartialResults, fingerprint, flatten
from blip2.evaluation.runner import generate_missing, write_json
from blip2.evaluation.tasks import TASKS, Task
from blip2.loading import load_blip2
from core.cli import ArgumentParser, run_cli
from core.config import DTYPES

PARTIAL, RESULTS, METRICS = "results.partial.jsonl", "results.json", "metrics.json"
GENERATION_FLAGS = {"num_beams": int, "max_new_tokens": int, "min_new_tokens": int, "length_penalty": float,
                    "repetition_penalty": float}
LEFT_OUT = "METEOR and SPICE need Java (coco-caption) and are not computed"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=sorted(TASKS))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a Hugging Face BLIP-2 OPT folder")
    src.add_argument("--ckpt", help="a weight file or Lightning checkpoint (with --config, or --tokenizer)")
    p.add_argument("--config", help="a yaml whose 'model' builds the network of --ckpt")
    p.add_argument("--tokenizer", help="the tokenizer folder of a Blip2OPTFinetune checkpoint")
    p.add_argument("--annotations", required=True, help="the annotation file (VQA: the annotations of --questions)")
    p.add_argument("--questions", help="vqav2 / okvqa: the questions file")
    p.add_argument("--images", required=True, help="the image folder the annotations refer to")
    p.add_argument("--out", required=True, help="folder for results.json, metrics.json and the partial results")
    p.add_argument("--prompt", help="captioning: the caption prefix (default 'a photo of')")
    p.add_argument("--template", help="VQA: the prompt template (default 'Question: {} Short answer:')")
    for name, kind in GENERATION_FLAGS.items():
        p.add_argument(f"--{name}", type=kind, help="default: the task's (see blip2/evaluation/tasks.py)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--num_workers", type=int, default=4, help="image decoding workers")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--image_size", type=int, help="input resolution, when not the model's")
    p.add_argument("--limit", type=int, help="evaluate the first N items only (scores then cover those)")
    p.add_argument("--overwrite", action="store_true", help="discard the partial results of a different run")
    return p.parse_args(argv)


def configure(opt: argparse.Namespace) -> Task:
    """The task with this run's prompt and generation settings; wrong combinations are one line."""
    task = TASKS[opt.task]
    if opt.config and not opt.ckpt:
        raise ValueError("--config needs --ckpt (the weights to load into the model it builds)")
    for flag, path, is_there in (("--model", opt.model, Path.is_dir), ("--ckpt", opt.ckpt, Path.is_file),
                                 ("--config", opt.config, Path.is_file), ("--tokenizer", opt.tokenizer, Path.is_dir)):
        if path is not None and not is_there(Path(path)):
            raise ValueError(f"{path}: not found ({flag})")
    if opt.batch_size < 1 or (opt.limit is not None and opt.limit < 1):
        raise ValueError("--batch_size and --limit must be >= 1")
    if task.kind == "caption" and opt.template is not None:
        raise ValueError(f"{opt.task}: --template is for the VQA tasks; captioning takes --prompt")
    if task.kind == "vqa" and opt.prompt is not None:
        raise ValueError(f"{opt.task}: --prompt is for captioning; the VQA tasks take --template")
    prompt = opt.prompt if task.kind == "caption" else opt.template
    if task.kind == "vqa" and prompt is not None and "{}" not in prompt:
        raise ValueError(f"--template {prompt!r}: expected a '{{}}' where the question goes")
    given = {name: getattr(opt, name) for name in GENERATION_FLAGS if getattr(opt, name) is not None}
    return dataclasses.replace(task, prompt=task.prompt if prompt is None else prompt,
                               generation={**task.generation, **given})


def identity(opt: argparse.Namespace, task: Task) -> tuple[dict, dict]:
    """(what decides the outputs, compared on resume; where things are, recorded only)."""
    model_files = [path for path in (opt.model, opt.ckpt, opt.config, opt.tokenizer) if path]
    annotation_files = [path for path in (opt.questions, opt.annotations) if path]
    same = {"task": task.name, "model": fingerprint(model_files), "annotations": fingerprint(annotation_files),
            "prompt": task.prompt, "generation": dict(task.generation), "dtype": opt.dtype,
            "image_size": opt.image_size}
    where = {"model": [str(Path(p).resolve()) for p in model_files],
             "annotations": [str(Path(p).resolve()) for p in annotation_files],
             "images": str(Path(opt.images).resolve())}
    return same, where


def evaluate(argv: list[str]) -> int:
    opt = parse_args(argv)
    task = configure(opt)
    items = task.read(opt.annotations, opt.images, opt.questions)[: opt.limit]
    check_images(items, opt.questions or opt.annotations)
    same, where = identity(opt, task)
    out = Path(opt.out)
    with PartialResults(out / PARTIAL, same, where, opt.overwrite) as results:
        if any(item.key not in results.done for item in items):
            model, processor = load_blip2(opt.model or opt.ckpt, opt.config, tokenizer=opt.tokenizer,
                                          dtype=DTYPES[opt.dtype], device=opt.device, image_size=opt.image_size)
            generate_missing(model, processor, task, items, results, task.generation, opt.batch_size,
                             opt.num_workers, opt.device)
        outputs = {item.key: results.done[item.key] for item in items}
    write_json(out / RESULTS, task.records(items, outputs))
    scores = task.score(items, outputs)
    write_json(out / METRICS, {"task": task.name, "items": len(items), "scores": scores, "units": "percent",
                               "prompt": task.prompt, "generation": dict(task.generation), **where,
                               **({"left_out": LEFT_OUT} if task.kind == "caption" else {})})
    print(f"{task.name} ({len(items)} items): " + ", ".join(f"{k} {v:.2f}" for k, v in flatten(scores).items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("evaluate_blip2.py", evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())
