"""The toy world end to end: the README's main command (DreamBooth with prior preservation on the
shipped toy base model) and the learning results of scripts/evaluate_toy.py (toy/evaluate.py) at
fixed seeds."""
import os
import shlex
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.sd_fixtures import ROOT
from toy.evaluate import evaluate, load_sd, parse_args

# Measured with these settings (200 test images, 2 samples a prompt, 32 samples for rows 3 and 4) on
# the shipped weights: captioner exact 0.715; base exact 0.683, colour 1.0; subject read 0.438 (base),
# 0.906 / 1.0 (with / without prior preservation); similarity 0.416 -> 0.921 / 0.946; "a circle" in
# the subject's colour 0.0 / 0.938, read as a circle 0.531 / 0.281, colour entropy 0.419 / 0.145.
# The thresholds leave margins for other CPUs' rounding.
MODELS = ("base model", "DreamBooth with prior preservation", "DreamBooth without prior preservation")
CAPTION_EXACT, BASE_EXACT, BASE_COLOUR = 0.685, 0.6, 0.95
SUBJECT_MATCH, SIMILARITY_GAIN = 0.8, 0.3
CLASS_CORRECT, DRIFT_GAP = 0.45, 0.6
# Two subjects in one run, 200 steps, 8 class images a class, 16 samples a prompt: "a sks circle" read
# as its own subject 0.75 and as the other 0.25, similarity 0.842 / -0.035; "a ohwx square" 1.0 and
# 0.0, 0.940 / -0.044; the base model 0.3125 and 0.0 own, similarity 0.266 and -0.156.
TWO_STEPS, TWO_CLASS_IMAGES, TWO_NUM = 200, 8, 16
TWO_OWN, TWO_OTHER, TWO_SIMILARITY_GAP = 0.6, 0.35, 0.5

def readme_main_command() -> list[str]:
    """README command 1 after the setup step, with this interpreter for .venv/bin/python."""
    text = (ROOT / "README.md").read_text()
    line = next(l for l in text.splitlines() if "bash scripts/setup.sh &&" in l and "main.py" in l)
    command = line.split("&&", 1)[1].strip()
    return [sys.executable if w == ".venv/bin/python" else w for w in shlex.split(command)]


def test_readme_main_command_runs_dreambooth_on_the_toy_world(tmp_path):
    for name in ("configs", "models", "data", "main.py", "ldm", "blip2", "toy", "scripts"):
        os.symlink(ROOT / name, tmp_path / name)
    argv = readme_main_command()
    assert argv[1] == "main.py" and "--reg_data_root" in argv and "configs/toy/dreambooth.yaml" in argv
    out = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr[-3000:]
    reg = tmp_path / argv[argv.index("--reg_data_root") + 1]
    assert len(list(reg.glob("*.png"))) == 64  # class images sampled by the base model
    run = next((tmp_path / "logs").glob("*_toy_subject"))
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
def results(tmp_path_factory):
    torch.set_num_threads(2)
    argv = ["--out", str(tmp_path_factory.mktemp("toy_eval")), "--num_test", "200", "--per_prompt", "2",
            "--num", "32", "--parts", "one_subject"]
    return evaluate(parse_args(argv))


def test_captioner_reads_held_out_images(results):
    cap = results["captioner"]
    assert cap["num"] == 200
    assert cap["exact"] >= CAPTION_EXACT and cap["colour"] >= 0.97 and cap["background"] >= 0.97


def test_base_model_follows_prompts(results):
    base = results["prompt_following"]
    assert base["n"] == 60
    assert base["exact"] >= BASE_EXACT and base["colour"] >= BASE_COLOUR and base["background"] >= 0.9


def test_dreambooth_learns_the_subject(results):
    base, prior, no_prior = (results["models"][k] for k in MODELS)
    for tuned in (prior, no_prior):
        assert tuned["subject_match"] >= SUBJECT_MATCH and tuned["subject_match"] >= base["subject_match"] + 0.3
        assert tuned["subject_similarity"] > base["subject_similarity"] + SIMILARITY_GAIN


def test_prior_preservation_keeps_the_class_and_its_diversity(results):
    base, prior, no_prior = (results["models"][k] for k in MODELS)
    assert no_prior["class_subject_colour"] >= prior["class_subject_colour"] + DRIFT_GAP  # drift without it
    assert prior["class_subject_colour"] <= base["class_subject_colour"] + 0.05
    assert no_prior["class_similarity"] > prior["class_similarity"] + 0.5
    assert prior["class_correct"] >= CLASS_CORRECT and prior["class_correct"] >= no_prior["class_correct"] + 0.15
    assert prior["class_colour_entropy"] > no_prior["class_colour_entropy"]


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
    assert two["photo_own_match"] == [1.0, 1.0]
    for identifier in ("sks", "ohwx"):
        m = tuned[identifier]
        assert m["n"] == TWO_NUM
        assert m["own_match"] >= TWO_OWN and m["own_match"] >= base[identifier]["own_match"] + 0.3, (identifier, m)
        assert m["other_match"] <= TWO_OTHER, (identifier, m)
        assert m["own_similarity"] >= m["other_similarity"] + TWO_SIMILARITY_GAP, (identifier, m)
        assert m["own_similarity"] >= base[identifier]["own_similarity"] + 0.3, (identifier, m)
