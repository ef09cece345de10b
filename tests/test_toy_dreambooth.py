"""The toy world end to end: the README's main command (DreamBooth with prior preservation on the
shipped toy base model) and the learning results of scripts/evaluate_toy.py (toy/evaluate.py) at
fixed seeds."""
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.sd_fixtures import ROOT
from toy import figure as figure_layout
from toy.evaluate import FIGURE, evaluate, load_sd, parse_args

# Measured with these settings (200 test images, 4 samples a prompt, 32 samples for rows 3 and 4; the
# run with prior preservation is README command 1's; DDIM 25 steps, guidance 3): captioner exact 0.995;
# base exact 0.917 (the README run's, same seeds), colour 1.0; subject read 0.188 (base), 0.938 / 0.938
# (with / without prior preservation); subject fidelity 0.473 -> 0.842 / 0.849; prompt fidelity
# 0.969 / 1.0; PRES 0.264 (base), 0.456 / 0.634; DIV 0.425 (base), 0.415 / 0.224; "a circle" read as
# a circle 0.969 / 1.0. The thresholds leave margins for other CPUs' rounding; the judge's, the base
# model's and the ablation's are issue 14's targets (captioner exact >= 0.95 and each attribute >= 0.97;
# base >= 0.85; PRES lower and DIV higher with prior preservation, DIV >= 0.9 of the base model's,
# subject fidelity within 0.05 of the run without it).
MODELS = ("base model", "DreamBooth with prior preservation", "DreamBooth without prior preservation")
CAPTION_EXACT, CAPTION_ATTRIBUTE, BASE_EXACT, BASE_COLOUR = 0.95, 0.97, 0.85, 0.95
SUBJECT_MATCH, SIMILARITY_GAIN, PROMPT_FIDELITY, FIDELITY_GAP = 0.8, 0.3, 0.85, 0.05
PRES_GAP, PRES_OVER_BASE, DIV_GAP, DIV_OF_BASE, CLASS_CORRECT = 0.1, 0.25, 0.1, 0.9, 0.85
# Two subjects in one run, 200 steps, 8 class images a class, 16 samples a prompt: "a sks circle" read
# as its own subject 0.625 and as the other 0.0625, similarity 0.643 / 0.269; "a ohwx square" 1.0 and
# 0.0, 0.764 / 0.205; the base model 0.0625 and 0.0 own, similarity 0.414 and 0.012.
TWO_STEPS, TWO_CLASS_IMAGES, TWO_NUM = 200, 8, 16
TWO_OWN, TWO_OTHER, TWO_SIMILARITY_GAP, TWO_SIMILARITY_GAIN = 0.5, 0.35, 0.25, 0.15

def readme_main_command() -> list[str]:
    """README command 1 after the setup step, with this interpreter for .venv/bin/python."""
    text = (ROOT / "README.md").read_text()
    line = next(l for l in text.splitlines() if "bash scripts/setup.sh &&" in l and "main.py" in l)
    command = line.split("&&", 1)[1].strip()
    return [sys.executable if w == ".venv/bin/python" else w for w in shlex.split(command)]


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    """README command 1 run in a scratch folder: (folder, its command, its run folder). The
    evaluation below measures this run as its DreamBooth with prior preservation."""
    tmp_path = tmp_path_factory.mktemp("readme")
    for name in ("configs", "models", "data", "main.py", "ldm", "blip2", "toy", "scripts"):
        os.symlink(ROOT / name, tmp_path / name)
    argv = readme_main_command()
    out = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr[-3000:]
    return tmp_path, argv, next((tmp_path / "logs").glob("*_toy_subject"))


def test_readme_main_command_runs_dreambooth_on_the_toy_world(readme_run):
    tmp_path, argv, run = readme_run
    assert argv[1] == "main.py" and "--reg_data_root" in argv and "configs/toy/dreambooth.yaml" in argv
    reg = tmp_path / argv[argv.index("--reg_data_root") + 1]
    assert len(list(reg.glob("*.png"))) == 64  # class images sampled by the base model
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert sorted(run.glob("images/step-*/grid.png"))
    assert list((run / "tensorboard").glob("events.*"))
    exported = load_file(str(run / "export" / "model.safetensors"))
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) or
               k in ("betas", "scale_factor") or "alphas" in k or "posterior" in k or "sqrt" in k for k in exported)
    model = load_sd(run / "export" / "model.safetensors")  # loads strictly with configs/toy/sd.yaml
    assert model.scale_factor.item() == load_file(str(ROOT / "models/toy/sd.safetensors"))["scale_factor"].item()
    sample = subprocess.run([sys.executable, "scripts/sample.py", "--config", "configs/toy/sd.yaml", "--ckpt",
                             str(run / "export" / "model.safetensors"), "--prompt", "a sks circle", "--H", "32",
                             "--W", "32", "--ddim_steps", "10", "--n_samples", "2", "--n_iter", "1", "--outdir",
                             str(tmp_path / "samples")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert sample.returncode == 0, sample.stderr[-2000:]
    assert len(list((tmp_path / "samples" / "samples").glob("*.png"))) == 2


# ---- the learning results (toy/evaluate.py, fewer samples than the README's table) -----------------
@pytest.fixture(scope="module")
def results(tmp_path_factory, readme_run):
    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("toy_eval")
    argv = ["--out", str(out), "--num_test", "200", "--per_prompt", "4", "--num", "32", "--parts", "one_subject",
            "--prior_run", str(readme_run[2] / "export" / "model.safetensors")]
    return {**evaluate(parse_args(argv)), "out": out}


def test_captioner_reads_held_out_images(results):
    cap = results["captioner"]
    assert cap["num"] == 200
    assert cap["exact"] >= CAPTION_EXACT and all(cap[a] >= CAPTION_ATTRIBUTE for a in ("colour", "shape", "background"))


def test_base_model_follows_prompts(results):
    base = results["prompt_following"]
    assert base["n"] == 120
    assert base["exact"] >= BASE_EXACT and base["colour"] >= BASE_COLOUR and base["background"] >= 0.9


def test_dreambooth_learns_the_subject(results):
    print({k: {m: round(v, 3) for m, v in results["models"][k].items()} for k in MODELS},
          results["captioner"], results["prompt_following"], results["photos"])
    base, prior, no_prior = (results["models"][k] for k in MODELS)
    for tuned in (prior, no_prior):
        assert tuned["subject_match"] >= SUBJECT_MATCH and tuned["subject_match"] >= base["subject_match"] + 0.3
        assert tuned["subject_fidelity"] > base["subject_fidelity"] + SIMILARITY_GAIN
        assert tuned["prompt_fidelity"] >= PROMPT_FIDELITY
    assert abs(prior["subject_fidelity"] - no_prior["subject_fidelity"]) <= FIDELITY_GAP


def test_prior_preservation_stops_the_drift_and_keeps_the_diversity(results):
    """The paper's Table 3 in both directions: PRES lower and DIV higher with prior preservation."""
    base, prior, no_prior = (results["models"][k] for k in MODELS)
    assert no_prior["pres"] > prior["pres"] + PRES_GAP and prior["pres"] <= base["pres"] + PRES_OVER_BASE
    assert prior["div"] > no_prior["div"] + DIV_GAP and prior["div"] >= DIV_OF_BASE * base["div"]
    assert prior["class_correct"] >= CLASS_CORRECT


def test_evaluation_draws_the_samples_beside_the_subject_photos(results):
    figure = Image.open(results["out"] / FIGURE)
    cell = 32 * 2 + figure_layout.PAD
    assert figure.size == (figure_layout.LABEL_WIDTH + 2 * (8 * cell + figure_layout.GAP),
                           figure_layout.TITLE_HEIGHT + 4 * cell + figure_layout.PAD)
    photo = Image.open(sorted((ROOT / "data/toy_subject").glob("*.png"))[0]).convert("RGB")
    x, y = figure_layout.LABEL_WIDTH, figure_layout.TITLE_HEIGHT
    top_left = figure.convert("RGB").crop((x, y, x + 64, y + 64))
    assert np.array_equal(np.asarray(top_left), np.asarray(photo.resize((64, 64), Image.Resampling.NEAREST)))
    for row in range(1, 4):  # every model's row holds samples, not the white canvas
        cells = np.asarray(figure.convert("RGB").crop((x, y + row * cell, x + 64, y + row * cell + 64)))
        assert cells.std() > 10


# ---- two subjects in one run (result 5): a shorter run than the README's, fewer samples --------------
@pytest.fixture(scope="module")
def two(tmp_path_factory):
    torch.set_num_threads(2)
    argv = ["--out", str(tmp_path_factory.mktemp("toy_two")), "--parts", "two_subjects", "--num", str(TWO_NUM),
            "--train_steps", str(TWO_STEPS), "--set", f"dreambooth.num_class_images={TWO_CLASS_IMAGES}",
            "lightning.callbacks.image_logger=null"]
    return evaluate(parse_args(argv))["two_subjects"]


def test_two_subjects_learned_in_one_run_each_identifier_shows_its_own(two):
    base, tuned = (two["models"][k] for k in ("base model", "DreamBooth, both subjects in one run"))
    print(two["models"])
    assert two["photo_own_match"] == [1.0, 1.0]
    for identifier in ("sks", "ohwx"):
        m = tuned[identifier]
        assert m["n"] == TWO_NUM
        assert m["own_match"] >= TWO_OWN and m["own_match"] >= base[identifier]["own_match"] + 0.3, (identifier, m)
        assert m["other_match"] <= TWO_OTHER, (identifier, m)
        assert m["own_similarity"] >= m["other_similarity"] + TWO_SIMILARITY_GAP, (identifier, m)
        assert m["own_similarity"] >= base[identifier]["own_similarity"] + TWO_SIMILARITY_GAIN, (identifier, m)
