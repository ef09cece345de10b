"""Caption images (or answer questions about them) with BLIP-2 OPT.

    python scripts/caption.py photos/ --model models/blip2-opt-2.7b-coco --prompt "a photo of" \
        --output captions.jsonl --sidecar
    python scripts/caption.py list.txt --model models/blip2-opt-2.7b --question "what is in the picture?" \
        --num_beams 5 --length_penalty -1 --max_new_tokens 10 --output answers.csv

Inputs are image files, folders (searched recursively by extension) and list files (one image
path a line). The model (``blip2.loading.load_blip2``): ``--model`` a Hugging Face folder or a
Lightning checkpoint of ``main.py`` (its tokenizer from the folder it names, or ``--tokenizer``);
``--config`` with ``--ckpt``: a yaml whose ``model`` builds a ``Blip2OPT`` or a ``Blip2OPTFinetune``
(e.g. the config ``main.py`` saved in the run folder) and its weights or Lightning checkpoint;
``--lavis`` a LAVIS ``.pth`` with ``--opt`` its OPT folder and ``--vit`` the EVA ViT file (unless
it holds its own ViT), into BLIP-2's architecture (or the one ``--config`` builds):

    python scripts/caption.py photos/ --lavis blip2_caption_opt2.7b.pth --opt models/opt-2.7b \
        --prompt "a photo of"

Unreadable images are reported on stderr by name and skipped; the exit code is then 1. Bad input
is one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from blip2.captioning import (
    VQA_TEMPLATE, batches, collect_inputs, describe, load_batch, read_questions, record_writer, records,
    check_sidecars,
    write_sidecar,
)
from blip2.loading import load_blip2
from core.cli import ArgumentParser, run_cli
from core.config import DTYPES
from core.weights import check_output

GENERATION_FLAGS = {  # name: type; None leaves the model's generation config in charge
    "num_beams": int, "max_new_tokens": int, "min_new_tokens": int, "length_penalty": float,
    "repetition_penalty": float, "no_repeat_ngram_size": int, "num_return_sequences": int,
    "temperature": float, "top_k": int, "top_p": float,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="image files, folders or list files")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a Hugging Face BLIP-2 OPT folder, or a Lightning checkpoint of main.py")
    src.add_argument("--ckpt", help="weights for --config (.safetensors, .ckpt, or a Lightning checkpoint)")
    src.add_argument("--lavis", help="a LAVIS checkpoint (.pth), with --opt (and --vit)")
    p.add_argument("--config", help="a yaml whose 'model' builds a Blip2OPT or Blip2OPTFinetune (for --ckpt, --lavis)")
    p.add_argument("--vit", help="the EVA ViT-g file of --lavis (eva_vit_g.pth)")
    p.add_argument("--opt", help="the OPT folder of --lavis (facebook/opt-2.7b layout: config, weights, tokenizer)")
    p.add_argument("--tokenizer", help="tokenizer folder for a Lightning checkpoint in --model")
    p.add_argument("--base_weights", metavar="DIR",
                   help="a lean training checkpoint's base HF folder, when it was moved (its content is checked)")
    p.add_argument("--image_size", type=int, default=None, help="input resolution (default: the model's)")
    p.add_argument("--prompt", default=None, help='caption prefix, e.g. "a photo of" (not echoed back)')
    p.add_argument("--question", default=None, help="VQA: ask this about every image")
    p.add_argument("--questions", default=None, help="VQA: a file of questions, one a line, asked of every image")
    p.add_argument("--template", default=VQA_TEMPLATE, help="VQA prompt template")
    for name, kind in GENERATION_FLAGS.items():
        p.add_argument(f"--{name}", type=kind, default=None)
    p.add_argument("--early_stopping", action="store_true", help="beam search stops at num_beams finished beams")
    p.add_argument("--do_sample", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output", default="captions.jsonl", help="JSONL, or CSV when the name ends in .csv")
    p.add_argument("--sidecar", action="store_true", help="also write <image stem>.txt next to each image")
    p.add_argument("--overwrite", action="store_true", help="with --sidecar: replace caption files that exist")
    return p.parse_args(argv)


def generation_options(opt: argparse.Namespace) -> dict:
    """The generation flags that were given, as ``generate`` keywords."""
    gen = {name: getattr(opt, name) for name in GENERATION_FLAGS if getattr(opt, name) is not None}
    gen.update({flag: True for flag in ("do_sample", "early_stopping") if getattr(opt, flag)})
    return gen


def check(opt: argparse.Namespace, questions: list[str]) -> None:
    if opt.model and not Path(opt.model).exists():
        raise ValueError(f"{opt.model}: model folder or checkpoint not found")
    if opt.ckpt and not opt.config:
        raise ValueError("--ckpt needs --config (the model to load it into); a HF folder or a Lightning "
                         "checkpoint goes in --model")
    if opt.lavis and not opt.opt:
        raise ValueError("--lavis needs --opt (the OPT folder: its language model and tokenizer)")
    if (opt.vit or opt.opt) and not opt.lavis:
        raise ValueError("--vit and --opt belong to --lavis (a LAVIS checkpoint)")
    if opt.config and not (opt.ckpt or opt.lavis):
        raise ValueError("--config needs --ckpt (the weights to load into the model it builds) or --lavis")
    if opt.tokenizer and not opt.model:
        raise ValueError("--tokenizer is for a Lightning checkpoint in --model")
    if opt.base_weights and not (opt.model or opt.ckpt):
        raise ValueError("--base_weights completes a lean training checkpoint (--model last.ckpt, or --ckpt)")
    if questions and opt.sidecar:
        raise ValueError("--sidecar writes captions; it cannot be combined with --question/--questions")
    if questions and opt.prompt:
        raise ValueError("--prompt is for captioning; VQA prompts come from --template")


def process(chunk: list[Path], model, processor, questions: list[str], gen: dict, opt: argparse.Namespace,
            write) -> int:
    """Caption or answer one batch, write its records (and sidecars); return how many failed to load."""
    good, images, errors = load_batch(chunk)
    for line in errors:
        tqdm.write(f"skipped: {line}", file=sys.stderr)
    if images:
        pixel_values = processor(images).to(opt.device)  # (B, 3, s, s)
        tasks = describe(model, pixel_values, opt.prompt, questions, opt.template, **gen)
        for record in records(good, tasks):
            write(record)
        if opt.sidecar:
            for path, texts in zip(good, tasks[0][2]):
                write_sidecar(path, texts)
    return len(errors)


def run(opt: argparse.Namespace) -> int:
    """Caption or answer every input; return the number of images that could not be read."""
    questions = read_questions(opt.question, opt.questions)
    check(opt, questions)
    paths = collect_inputs(opt.inputs)
    check_output(opt.output, "--output", overwrite=True, inputs=paths)  # a new captions file replaces the old
    if opt.sidecar:
        check_sidecars(paths, opt.overwrite)
    model, processor = load_blip2(opt.model or opt.ckpt or opt.lavis, opt.config, tokenizer=opt.tokenizer,
                                  dtype=DTYPES[opt.dtype], device=opt.device, image_size=opt.image_size,
                                  vit=opt.vit, opt=opt.opt, base=opt.base_weights)
    torch.manual_seed(opt.seed)
    gen = generation_options(opt)
    fields = ["image", "question", "answer"] if questions else ["image", "prompt", "caption"]
    failed = 0
    with record_writer(opt.output, fields) as write, tqdm(total=len(paths), unit="img") as bar:
        for chunk in batches(paths, opt.batch_size):
            failed += process(chunk, model, processor, questions, gen, opt, write)
            bar.update(len(chunk))
    return failed


def caption(argv: list[str]) -> int:
    """Exit code 0, or 1 when some images could not be read."""
    failed = run(parse_args(argv))
    if failed:
        print(f"caption.py: {failed} image(s) could not be read, see above", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("caption.py", caption, argv)


if __name__ == "__main__":
    sys.exit(main())
