"""Measure that the toy world's models learn (README, "The toy world"): five results.

1. captioner: the toy BLIP-2's attribute-level exact match on held-out test images;
2. base model: prompt following, "a <colour> <shape> on a <background> background" for all 30
   attribute combinations, judged by that captioner;
3. DreamBooth, "a sks circle" samples of the base model and of DreamBooth with and without prior
   preservation, in the DreamBooth paper's terms (Sec. 4.1): subject fidelity, the mean cosine
   similarity to the subject photos in the captioner's image embedding (``toy.judge.embed_images``:
   the mean of the Q-Former's visual prompt, the toy analog of DINO / CLIP-I); prompt fidelity, the
   share read as the class noun (the toy CLIP-T); and how often the captioner reads the subject's
   colour and background;
4. the prior preservation ablation (Sec. 4.3, Table 3), "a circle" samples: PRES, their mean
   similarity to the subject photos in the same embedding (prior drift, lower is better), and DIV,
   their mean pairwise distance 1 - cosine (diversity, higher is better), with the class read
   back, the share in the subject's colour and the colour entropy; the figure ``FIGURE`` shows the
   samples of results 3 and 4 of every model beside the subject photos;
5. two subjects in one run (``dreambooth.concepts``, configs/toy/dreambooth-two.yaml): for each
   identifier ("a sks circle", "a ohwx square"), of the base model and of the two-subject run, how
   often the captioner reads its own subject and how often the other one, and the similarity to
   its own subject's photos and to the other's.

The DreamBooth runs go through main.py with configs/toy/dreambooth.yaml, on the same subject
photos and seed; the runs with prior preservation sample their class images first (the two-subject
run reuses the "a circle" ones). ``--parts`` picks results 1-4 (one_subject), 5 (two_subjects) or both.

    python scripts/evaluate_toy.py --out outputs/toy_eval     # tables in outputs/toy_eval/results.md, figure samples.png
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from omegaconf import OmegaConf

from core.cli import ArgumentParser, run_cli
from core.config import load_config
from ldm.txt2img import sampling_mode, txt2img
from ldm.loading import load_model
from toy import ROOT
from toy.figure import ablation_figure, save_figure
from toy.judge import (
    attribute_scores,
    caption_accuracy,
    caption_images,
    embed_images,
    load_captioner,
    parse_caption,
)
from toy.shapes import (
    ATTRIBUTES,
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    SUBJECT,
    SUBJECTS,
    subject_scene,
    write_images,
)

SD_CONFIG = ROOT / "configs/toy/sd.yaml"
DREAMBOOTH_CONFIG = ROOT / "configs/toy/dreambooth.yaml"
TWO_SUBJECTS_CONFIG = ROOT / "configs/toy/dreambooth-two.yaml"
PARTS = ("one_subject", "two_subjects")
FIGURE = "samples.png"  # written by results 3-4: rows base / with / without prior preservation


# ---- sampling and judging ---------------------------------------------------------------------------
def load_sd(ckpt: str | Path) -> Any:
    return load_model(load_config([SD_CONFIG]), ckpt)


def sample(model: Any, prompts: Sequence[str], seed: int, steps: int, scale: float, batch: int = 64) -> list[Image.Image]:
    """One image per prompt; image i from noise seed ``seed + i`` (DDIM, classifier-free guidance)."""
    images = []
    with sampling_mode(model):
        for k in range(0, len(prompts), batch):
            chunk = list(prompts[k:k + batch])
            seeds = [seed + k + j for j in range(len(chunk))]
            images += [Image.fromarray(a) for a in txt2img(model, chunk, seeds, 32, 32, steps, scale)]
    return images


def judged(captioner: Any, images: Sequence[Image.Image]) -> list[dict[str, str | None]]:
    return [parse_caption(c) for c in caption_images(captioner, images)]


def reads_as_subject(read: dict[str, str | None], subject: dict = SUBJECT) -> bool:
    """The subject's colour on its background. Its shape is not asked: the captioner never saw the
    subject's dot and reads the subject's own photos as a square or a triangle as often as a circle."""
    return read["colour"] == subject["colour"] and read["background"] == subject["background"]


def mean_similarity(captioner: Any, images: Sequence[Image.Image], references: Sequence[Image.Image]) -> float:
    """Mean cosine similarity over all (image, reference) pairs of the captioner's image embeddings."""
    a, b = embed_images(captioner, images), embed_images(captioner, references)
    return float((a @ b.T).mean())


def colour_entropy(colours: Sequence[str | None]) -> float:
    """Entropy of the colours read, divided by log(number of colours): 1 = uniform, 0 = one colour."""
    counts = Counter(c for c in colours if c is not None)
    total = sum(counts.values())
    if total == 0:
        return 0.0
    return -sum(n / total * math.log(n / total) for n in counts.values()) / math.log(len(COLOURS))


# ---- the four measurements ------------------------------------------------------------------------
def prompt_following(model: Any, captioner: Any, per_prompt: int, seed: int, steps: int, scale: float) -> dict:
    combos = [(c, s, b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS]
    wanted = [dict(zip(ATTRIBUTES, combo)) for combo in combos for _ in range(per_prompt)]
    prompts = [f"a {w['colour']} {w['shape']} on a {w['background']} background" for w in wanted]
    read = judged(captioner, sample(model, prompts, seed, steps, scale))
    return {**attribute_scores(read, wanted), "n": len(wanted)}


def mean_pairwise_distance(captioner: Any, images: Sequence[Image.Image]) -> float:
    """DIV: the mean over pairs i != j of 1 - cos(e_i, e_j), e the captioner's unit image embeddings."""
    e = embed_images(captioner, images)
    n = len(e)
    if n < 2:
        raise ValueError(f"mean_pairwise_distance: expected at least 2 images, got {n}")
    return float((1.0 - e @ e.T).sum() / (n * (n - 1)))  # the diagonal adds 0


def subject_and_class(model: Any, captioner: Any, photos: Sequence[Image.Image], num: int, seed: int,
                      steps: int, scale: float, token: str = "sks") -> tuple[dict, dict[str, list[Image.Image]]]:
    """Metrics 3 and 4 for one model, from "a <token> circle" and "a circle" samples (also returned,
    by prompt). In the paper's terms (DreamBooth, Sec. 4.1 and 4.3), in the captioner's embedding
    space: subject fidelity (DINO / CLIP-I), prompt fidelity (CLIP-T: the class noun read back),
    PRES (similarity of class samples to the subject) and DIV (their mean pairwise distance)."""
    word = SUBJECT["class_word"]
    prompts = (f"a {token} {word}", f"a {word}")
    subject_images, class_images = (sample(model, [p] * num, seed, steps, scale) for p in prompts)
    subject_read, class_read = judged(captioner, subject_images), judged(captioner, class_images)
    colours = [r["colour"] for r in class_read]
    metrics = {
        "subject_fidelity": mean_similarity(captioner, subject_images, photos),
        "prompt_fidelity": sum(r["shape"] == word for r in subject_read) / num,
        "subject_match": sum(map(reads_as_subject, subject_read)) / num,
        "pres": mean_similarity(captioner, class_images, photos),
        "div": mean_pairwise_distance(captioner, class_images),
        "class_correct": sum(r["shape"] == word for r in class_read) / num,
        "class_colours": len({c for c in colours if c is not None}),
        "class_colour_entropy": colour_entropy(colours),
        "class_subject_colour": sum(c == SUBJECT["colour"] for c in colours) / num,
        "n": num,
    }
    return metrics, dict(zip(prompts, (subject_images, class_images)))


def two_subjects(model: Any, captioner: Any, concepts: Sequence[dict], photos: Sequence[Sequence[Image.Image]],
                 num: int, seed: int, steps: int, scale: float) -> dict:
    """Metric 5 for one model: per identifier of ``concepts`` (subject k = ``SUBJECTS[k]``, photos
    ``photos[k]``), "a <identifier> <class word>" samples read as its own subject and as the other
    one, and their similarity to the photos of each."""
    results = {}
    for k, concept in enumerate(concepts):
        other = 1 - k
        prompt = f"a {concept['identifier']} {concept['class_word']}"
        images = sample(model, [prompt] * num, seed, steps, scale)
        read = judged(captioner, images)
        results[concept["identifier"]] = {
            "prompt": prompt,
            "own_match": sum(reads_as_subject(r, SUBJECTS[k]) for r in read) / num,
            "other_match": sum(reads_as_subject(r, SUBJECTS[other]) for r in read) / num,
            "own_similarity": mean_similarity(captioner, images, photos[k]),
            "other_similarity": mean_similarity(captioner, images, photos[other]),
            "n": num,
        }
    return results

# ---- DreamBooth runs --------------------------------------------------------------------------------
def class_folder(workdir: Path, class_word: str) -> Path:
    """Where the runs of one evaluation keep the class images of a class (shared between runs)."""
    return workdir / f"class_images_{class_word}"


def main_run(workdir: Path, name: str, argv: Sequence[str], steps: int | None, extra: Sequence[str]) -> Path:
    """Run main.py (run ``name``, logs under ``workdir/logs``); returns the exported weights."""
    from core import trainer

    argv = [*argv, "-n", name, "--logdir", str(workdir / "logs")]
    argv += [f"lightning.trainer.max_steps={steps}"] if steps else []
    before = set((workdir / "logs").glob("*"))
    if trainer.main(argv + list(extra)) != 0:
        raise RuntimeError(f"DreamBooth run '{name}' failed")
    (run,) = set((workdir / "logs").glob("*")) - before
    return run / "export" / "model.safetensors"


def dreambooth(base: Path, photos: Path, workdir: Path, prior: bool, steps: int | None,
               extra: Sequence[str] = ()) -> Path:
    """Run main.py with the toy DreamBooth config; returns the exported weights."""
    argv = ["--base", str(DREAMBOOTH_CONFIG), "-t", "--actual_resume", str(base), "--data_root", str(photos),
            "--class_word", SUBJECT["class_word"]]
    if prior:
        argv += ["--reg_data_root", str(class_folder(workdir, SUBJECT["class_word"]))]
    return main_run(workdir, "with_prior" if prior else "without_prior", argv, steps, extra)


def two_subject_concepts(photos: Sequence[Path], workdir: Path) -> list[dict]:
    """The concepts of configs/toy/dreambooth-two.yaml with these photo folders and ``workdir``'s class folders."""
    concepts = OmegaConf.to_container(OmegaConf.load(TWO_SUBJECTS_CONFIG).dreambooth.concepts)
    for concept, folder in zip(concepts, photos, strict=True):
        concept["data_root"] = str(folder)
        concept["class_data_root"] = str(class_folder(workdir, concept["class_word"]))
    return concepts


def dreambooth_two(base: Path, concepts: Sequence[dict], workdir: Path, steps: int | None,
                   extra: Sequence[str] = ()) -> Path:
    """Run main.py with configs/toy/dreambooth-two.yaml and ``concepts``; returns the exported weights."""
    override = workdir / "two_subjects.yaml"
    OmegaConf.save(OmegaConf.create({"dreambooth": {"concepts": list(concepts)}}), override)
    argv = ["--base", str(DREAMBOOTH_CONFIG), str(TWO_SUBJECTS_CONFIG), str(override), "-t", "--actual_resume",
            str(base)]
    return main_run(workdir, "two_subjects", argv, steps, extra)


# ---- report -----------------------------------------------------------------------------------------
def table(results: dict) -> str:
    """The markdown tables of the results measured."""
    parts = [table_one(results)] if "models" in results else []
    return "\n".join(parts + ([table_two(results["two_subjects"])] if "two_subjects" in results else []))


def table_one(results: dict) -> str:
    cap, base = results["captioner"], results["prompt_following"]
    rows = ["| measurement | value |", "| --- | --- |",
            f"| 1. captioner, held-out test images ({cap['num']}): all three attributes right | {cap['exact']:.3f} |",
            f"| 1. captioner: colour / shape / background right | {cap['colour']:.3f} / {cap['shape']:.3f} / "
            f"{cap['background']:.3f} |",
            f"| 2. base model, 30 prompts x {base['n'] // 30} samples: all three attributes as asked | "
            f"{base['exact']:.3f} |",
            f"| 2. base model: colour / shape / background as asked | {base['colour']:.3f} / {base['shape']:.3f} / "
            f"{base['background']:.3f} |", ""]
    rows += ["| model | 3. subject fidelity (DINO / CLIP-I analog) | 3. prompt fidelity (CLIP-T analog) | "
             "3. read in the subject's colour and background | 4. PRES (lower is better) | 4. DIV (higher is better) | "
             "4. \"a circle\": class-correct | 4. in the subject's colour | 4. colour entropy |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, m in results["models"].items():
        rows.append(f"| {name} | {m['subject_fidelity']:.3f} | {m['prompt_fidelity']:.3f} | {m['subject_match']:.3f} "
                    f"| {m['pres']:.3f} | {m['div']:.3f} | {m['class_correct']:.3f} | {m['class_subject_colour']:.3f} "
                    f"| {m['class_colour_entropy']:.3f} |")
    photos = results["photos"]
    rows.append(f"| the subject photos themselves | {photos['self_similarity']:.3f} | {photos['prompt_fidelity']:.3f} "
                f"| {photos['subject_match']:.3f} | | | | | |")
    return "\n".join(rows) + "\n"


def table_two(two: dict) -> str:
    rows = ["| 5. two subjects in one run | model | read as its own subject | read as the other subject | "
            "similarity to its own subject | similarity to the other subject |",
            "| --- | --- | --- | --- | --- | --- |"]
    for name, per_identifier in two["models"].items():
        for m in per_identifier.values():
            rows.append(f"| \"{m['prompt']}\" | {name} | {m['own_match']:.3f} | {m['other_match']:.3f} | "
                        f"{m['own_similarity']:.3f} | {m['other_similarity']:.3f} |")
    own = " / ".join(f"{v:.3f}" for v in two["photo_own_match"])
    self_similarity = " / ".join(f"{v:.3f}" for v in two["photo_self_similarity"])
    rows.append(f"| the photos of subjects 1 / 2 themselves | | {own} | | {self_similarity} | "
                f"{two['photo_cross_similarity']:.3f} |")
    return "\n".join(rows) + "\n"


def subject_photos(folder: str | None, out: Path, subject: int) -> Path:
    """The photos of ``SUBJECTS[subject]``: ``folder``, or four written to ``out`` when it is empty."""
    if folder:
        return Path(folder)
    return write_images([subject_scene(i, subject=subject) for i in range(4)], out / f"subject{subject + 1}", 32,
                        captions=False)


def read_photos(folder: Path) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))]


def photo_readings(captioner: Any, photos: Sequence[Image.Image]) -> dict:
    """The subject photos as the samples are judged: their self-similarity (the ceiling of subject
    fidelity), how often they read as the class noun and as the subject."""
    read = judged(captioner, photos)
    return {"self_similarity": mean_similarity(captioner, photos, photos),
            "prompt_fidelity": sum(r["shape"] == SUBJECT["class_word"] for r in read) / len(read),
            "subject_match": sum(map(reads_as_subject, read)) / len(read)}


def evaluate_one_subject(opt: argparse.Namespace, captioner: Any, photos_dir: Path, out: Path) -> dict:
    """Results 1-4, and the figure of the three models' samples (``FIGURE`` in ``out``)."""
    photos = read_photos(photos_dir)
    results: dict[str, Any] = {"captioner": caption_accuracy(captioner, "test", opt.num_test, opt.seed)}
    base = load_sd(opt.base)
    results["prompt_following"] = prompt_following(base, captioner, opt.per_prompt, opt.seed, opt.steps, opt.scale)
    with_prior = opt.prior_run or dreambooth(Path(opt.base), photos_dir, out, True, opt.train_steps, opt.set)
    runs = {"base model": opt.base, "DreamBooth with prior preservation": with_prior,
            "DreamBooth without prior preservation": dreambooth(Path(opt.base), photos_dir, out, False,
                                                                opt.train_steps, opt.set)}
    measured = {name: subject_and_class(load_sd(ckpt), captioner, photos, opt.num, opt.seed, opt.steps, opt.scale)
                for name, ckpt in runs.items()}
    results["models"] = {name: metrics for name, (metrics, _) in measured.items()}
    results["photos"] = photo_readings(captioner, photos)
    figure = ablation_figure({name: list(images.values()) for name, (_, images) in measured.items()}, photos,
                             [f'"{p}"' for p in next(iter(measured.values()))[1]])
    save_figure(figure, out / FIGURE)
    return results


def evaluate_two_subjects(opt: argparse.Namespace, captioner: Any, photo_dirs: Sequence[Path], out: Path) -> dict:
    """Result 5: the base model and the two-subject run, each identifier against both subjects."""
    concepts = two_subject_concepts(photo_dirs, out)
    photos = [read_photos(folder) for folder in photo_dirs]
    runs = {"base model": opt.base,
            "DreamBooth, both subjects in one run": dreambooth_two(Path(opt.base), concepts, out, opt.train_steps,
                                                                   opt.set)}
    models = {name: two_subjects(load_sd(ckpt), captioner, concepts, photos, opt.num, opt.seed, opt.steps, opt.scale)
              for name, ckpt in runs.items()}
    photo_reads = [judged(captioner, p) for p in photos]
    return {"models": models,
            "photo_own_match": [sum(reads_as_subject(r, SUBJECTS[k]) for r in read) / len(read)
                                for k, read in enumerate(photo_reads)],
            "photo_self_similarity": [mean_similarity(captioner, p, p) for p in photos],
            "photo_cross_similarity": mean_similarity(captioner, photos[0], photos[1])}


def evaluate(opt: argparse.Namespace) -> dict:
    torch.manual_seed(opt.seed)
    out = Path(opt.out)
    out.mkdir(parents=True, exist_ok=True)
    captioner = load_captioner(opt.captioner)
    photo_dirs = [subject_photos(opt.subject, out, 0), subject_photos(opt.subject2, out, 1)]
    results: dict[str, Any] = {}
    if "one_subject" in opt.parts:
        results.update(evaluate_one_subject(opt, captioner, photo_dirs[0], out))
    if "two_subjects" in opt.parts:
        results["two_subjects"] = evaluate_two_subjects(opt, captioner, photo_dirs, out)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(table(results))
    return results


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=str(ROOT / "models/toy/sd.safetensors"), help="the toy base model")
    p.add_argument("--captioner", default=str(ROOT / "models/toy/blip2"), help="the toy BLIP-2 folder")
    p.add_argument("--subject", default=str(ROOT / "data/toy_subject"), help="the subject photos (PNG)")
    p.add_argument("--subject2", default=str(ROOT / "data/toy_subject2"), help="the second subject's photos (PNG)")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                   help="results 1-4 (one_subject) and 5 (two_subjects)")
    p.add_argument("--out", default="outputs/toy_eval", help="folder for the runs, results.json, results.md and the figure samples.png")
    p.add_argument("--num_test", type=int, default=300, help="held-out test images for the captioner")
    p.add_argument("--per_prompt", type=int, default=4, help="base-model samples per attribute combination")
    p.add_argument("--num", type=int, default=64, help="samples per prompt for metrics 3 and 4")
    p.add_argument("--prior_run", default=None,
                   help="exported weights of a DreamBooth run with prior preservation to measure instead of "
                        "training one (e.g. README command 1's logs/<time>_toy_subject/export/model.safetensors)")
    p.add_argument("--train_steps", type=int, default=None, help="DreamBooth steps of every run (default: the config's)")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--scale", type=float, default=3.0,
                   help="classifier-free guidance scale (at 5 the base model pinches its squares: prompt following 0.83)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides for every DreamBooth run, e.g. dreambooth.num_class_images=16")
    return p.parse_args(argv)


def run(argv: Sequence[str]) -> int:
    results = evaluate(parse_args(argv))
    print(table(results))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python scripts/evaluate_toy.py``: bad input is one line on stderr and exit status 2."""
    return run_cli("evaluate_toy.py", run, argv)


if __name__ == "__main__":
    sys.exit(main())
