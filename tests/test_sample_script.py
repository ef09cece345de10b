"""scripts/sample.py end to end on a tiny sd-v1 shaped checkpoint, and the same images as the
training-time sample grids and class images (one text-to-image path, ``ldm.txt2img``)."""
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from core.config import load_config
from ldm.callbacks.class_images import ClassImageSampler
from ldm.callbacks.image_logger import ImageLogger
from ldm.loading import load_model
from ldm.txt2img import sampling_mode
from tests.sd_fixtures import ROOT, TINY_CONFIG, tiny_model

SCRIPT = ROOT / "scripts" / "sample.py"
_spec = importlib.util.spec_from_file_location("sample_script", SCRIPT)
sample_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sample_script)


def _main(*args):
    """In-process run (fast); the first test runs the script as users do, in a subprocess."""
    return sample_script.main(["--config", str(TINY_CONFIG), "--device", "cpu", "--precision", "full",
                               *map(str, args)])


def _run(*args, cwd):
    return subprocess.run([sys.executable, str(SCRIPT), "--config", str(TINY_CONFIG), "--device", "cpu",
                           "--precision", "full", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    torch.save({"state_dict": tiny_model(seed=7).state_dict(), "global_step": 1}, path)
    return path


def test_writes_png_samples_with_metadata_and_a_grid(tmp_path, tiny_ckpt):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a sks dog\n\na red circle\nan émoji 🐶 prompt\n", encoding="utf-8")
    out = tmp_path / "out"
    res = _run("--from-file", prompts, "--ckpt", tiny_ckpt, "--outdir", out, "--H", 32, "--W", 24,
               "--ddim_steps", 3, "--n_samples", 2, "--n_iter", 1, "--scale", 5.0, "--seed", 3, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    samples = sorted((out / "samples").glob("*.png"))
    assert [p.name for p in samples] == ["00000.png", "00001.png", "00002.png"]
    captions = []
    for i, p in enumerate(samples):
        img = Image.open(p)
        img.load()
        assert img.size == (24, 32) and img.mode == "RGB"
        captions.append(img.text["prompt"])
        params = json.loads(img.text["parameters"])
        assert params["seed"] == 3 + i and params["steps"] == 3 and params["sampler"] == "ddim"
    assert captions == ["a photo of a sks dog", "a red circle", "an émoji 🐶 prompt"]
    grids = list(out.glob("grid-*.png"))
    assert len(grids) == 1 and Image.open(grids[0]).size[0] > 24


def test_same_seed_same_images_and_plms(tmp_path, tiny_ckpt, monkeypatch):
    arrays = []
    for run in ("a", "b"):
        assert _main("--prompt", "a cat", "--ckpt", tiny_ckpt, "--outdir", tmp_path / run, "--H", 16, "--W", 16,
                     "--ddim_steps", 4, "--n_samples", 1, "--n_iter", 1, "--plms", "--skip_grid") == 0
        arrays.append(np.asarray(Image.open(tmp_path / run / "samples" / "00000.png")))
    assert np.array_equal(arrays[0], arrays[1]) and arrays[0].std() > 0
    assert Image.open(tmp_path / "a" / "samples" / "00000.png").text["sampler"] == "plms"
    from ldm.models.diffusion.ddpm import DDPM

    nhwc_calls, to_nhwc = [], DDPM.channels_last_denoiser
    monkeypatch.setattr(DDPM, "channels_last_denoiser", lambda self: nhwc_calls.append(1) or to_nhwc(self))
    assert _main("--prompt", "a cat", "--ckpt", tiny_ckpt, "--outdir", tmp_path / "nhwc", "--H", 16, "--W", 16,
                 "--ddim_steps", 4, "--n_samples", 1, "--n_iter", 1, "--plms", "--skip_grid", "--channels_last") == 0
    nhwc = np.asarray(Image.open(tmp_path / "nhwc" / "samples" / "00000.png")).astype(int)
    assert np.abs(nhwc - arrays[0]).max() <= 1 and nhwc_calls == [1]  # the same sample, up to 8-bit rounding


def test_clear_errors(tmp_path, tiny_ckpt, capsys):
    assert _main("--ckpt", tmp_path / "missing.ckpt", "--outdir", tmp_path / "o") == 2
    assert capsys.readouterr().err.strip() == f"sample.py: error: {tmp_path / 'missing.ckpt'}: checkpoint file not found"
    assert _main("--ckpt", tiny_ckpt, "--H", 34, "--outdir", tmp_path / "o") == 2  # a multiple of the VAE's 2 only
    assert capsys.readouterr().err.strip() == ("sample.py: error: --H 34 must be a positive multiple of 4 (the VAE "
                                               "factor times the UNet's down-sampling)")
    sd = tiny_model().state_dict()
    del sd["first_stage_model.decoder.conv_out.weight"]
    torch.save({"state_dict": sd}, tmp_path / "bad.ckpt")
    assert _main("--ckpt", tmp_path / "bad.ckpt", "--H", 16, "--W", 16, "--outdir", tmp_path / "o") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "bad.ckpt" in err and "first_stage_model.decoder.conv_out.weight" in err
    assert _main("--ckpt", tiny_ckpt, "--from-file", tmp_path / "none.txt", "--outdir", tmp_path / "o") == 2
    assert capsys.readouterr().err.strip() == f"sample.py: error: {tmp_path / 'none.txt'}: prompt file not found"


def test_bad_counts_prompts_and_prompt_files_are_one_line(tmp_path, tiny_ckpt, capsys):
    (tmp_path / "latin1.txt").write_bytes("a dog\na caf\xe9 by the sea\n".encode("latin-1"))
    cases = [(("--n_samples", 0), "--n_samples 0: expected a positive integer"),
             (("--n_iter", 0), "--n_iter 0: expected a positive integer"),
             (("--ddim_steps", -1), "--ddim_steps -1: expected a positive integer"),
             (("--W", 0), "--W 0 must be a positive multiple of 4"),
             (("--prompt", "  "), "--prompt is empty"),
             (("--prompt", " ".join(["dog"] * 500)), "prompt 1 is 500 tokens; the text encoder reads 75 (pass --truncate"),
             (("--from-file", tmp_path / "latin1.txt"), "latin1.txt: line 2 is not UTF-8 text")]
    for args, message in cases:
        assert _main("--ckpt", tiny_ckpt, "--H", 8, "--W", 8, *args, "--outdir", tmp_path / "o") == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (args, err)
    assert not (tmp_path / "o").exists()
    assert _main("--ckpt", tiny_ckpt, "--H", 8, "--W", 8, "--prompt", " ".join(["dog"] * 500), "--truncate",
                 "--n_samples", 1, "--n_iter", 1, "--ddim_steps", 2, "--outdir", tmp_path / "t") == 0


def _png(path):
    return np.asarray(Image.open(path))


def test_image_i_has_seed_s_plus_i_and_fixed_code_reuses_round_0(tmp_path, tiny_ckpt):
    common = ["--prompt", "a red circle", "--ckpt", tiny_ckpt, "--H", 16, "--W", 16, "--ddim_steps", 2,
              "--n_samples", 2, "--n_iter", 2, "--skip_grid"]
    assert _main(*common, "--seed", 3, "--outdir", tmp_path / "run") == 0
    assert _main(*common, "--seed", 5, "--outdir", tmp_path / "later") == 0
    assert _main(*common, "--seed", 3, "--fixed_code", "--outdir", tmp_path / "fixed") == 0
    run, later, fixed = ([_png(tmp_path / name / "samples" / f"{i:05}.png") for i in range(4)]
                         for name in ("run", "later", "fixed"))
    assert [Image.open(tmp_path / "run" / "samples" / f"{i:05}.png").text["seed"] for i in range(4)] == [
        "3", "4", "5", "6"]
    assert np.array_equal(run[2], later[0]) and np.array_equal(run[3], later[1])  # seeds 5 and 6
    assert not np.array_equal(run[0], run[2])
    assert np.array_equal(fixed[2], fixed[0]) and np.array_equal(fixed[3], fixed[1])
    assert np.array_equal(fixed[0], run[0]) and np.array_equal(fixed[1], run[1])


def test_the_same_image_as_the_training_grid_and_the_class_images(tmp_path, tiny_ckpt):
    """The same prompt, seed and settings: pixel-equal PNGs from sample.py, ImageLogger, ClassImageSampler."""
    prompt, seed, steps, scale = "a photo of a dog", 11, 3, 5.0
    assert _main("--prompt", prompt, "--ckpt", tiny_ckpt, "--outdir", tmp_path / "script", "--H", 32, "--W", 32,
                 "--ddim_steps", steps, "--scale", scale, "--n_samples", 2, "--n_iter", 1, "--seed", seed,
                 "--skip_grid") == 0
    model = load_model(load_config([TINY_CONFIG]), tiny_ckpt).train()
    logger = ImageLogger(every_n_steps=1, prompts=[prompt], ddim_steps=steps, scale=scale, seed=seed,
                         n_per_prompt=2, logdir=str(tmp_path / "run"))
    trainer = SimpleNamespace(global_step=1, global_rank=0, loggers=[], default_root_dir=str(tmp_path),
                              precision_plugin=SimpleNamespace(forward_context=contextlib.nullcontext))
    logger.log_images(trainer, model)
    classes = ClassImageSampler(str(tmp_path / "class"), "dog", num_class_images=2, base_seed=seed,
                                ddim_steps=steps, scale=scale, batch_size=2, prompt="a photo of a {}")
    with sampling_mode(model):
        classes.generate(model, [0, 1])
    for i in range(2):
        script = _png(tmp_path / "script" / "samples" / f"{i:05}.png")
        assert script.shape == (32, 32, 3) and script.std() > 0
        np.testing.assert_array_equal(script, _png(tmp_path / "run" / "images" / "step-000001" / f"{i:03d}.png"))
        np.testing.assert_array_equal(script, _png(tmp_path / "class" / f"class_{i:05d}.png"))
    assert not np.array_equal(_png(tmp_path / "script" / "samples" / "00000.png"),
                              _png(tmp_path / "script" / "samples" / "00001.png"))
