"""scripts/sample.py end to end on a tiny sd-v1 shaped checkpoint."""
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

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
                          timeout=300)


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
    for p in samples:
        img = Image.open(p)
        img.load()
        assert img.size == (24, 32) and img.mode == "RGB"
        captions.append(img.text["prompt"])
        params = json.loads(img.text["parameters"])
        assert params["seed"] == 3 and params["steps"] == 3 and params["sampler"] == "ddim"
    assert captions == ["a photo of a sks dog", "a red circle", "an émoji 🐶 prompt"]
    grids = list(out.glob("grid-*.png"))
    assert len(grids) == 1 and Image.open(grids[0]).size[0] > 24


def test_same_seed_same_images_and_plms(tmp_path, tiny_ckpt):
    arrays = []
    for run in ("a", "b"):
        assert _main("--prompt", "a cat", "--ckpt", tiny_ckpt, "--outdir", tmp_path / run, "--H", 16, "--W", 16,
                     "--ddim_steps", 4, "--n_samples", 1, "--n_iter", 1, "--plms", "--skip_grid") == 0
        arrays.append(np.asarray(Image.open(tmp_path / run / "samples" / "00000.png")))
    assert np.array_equal(arrays[0], arrays[1]) and arrays[0].std() > 0
    assert Image.open(tmp_path / "a" / "samples" / "00000.png").text["sampler"] == "plms"


def test_clear_errors(tmp_path, tiny_ckpt, capsys):
    assert _main("--ckpt", tmp_path / "missing.ckpt", "--outdir", tmp_path / "o") == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'missing.ckpt'}: checkpoint file not found"
    assert _main("--ckpt", tiny_ckpt, "--H", 33, "--outdir", tmp_path / "o") == 2
    assert capsys.readouterr().err.strip() == "error: --H 33 must be a multiple of 2"
    sd = tiny_model().state_dict()
    del sd["first_stage_model.decoder.conv_out.weight"]
    torch.save({"state_dict": sd}, tmp_path / "bad.ckpt")
    assert _main("--ckpt", tmp_path / "bad.ckpt", "--H", 16, "--W", 16, "--outdir", tmp_path / "o") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "bad.ckpt" in err and "first_stage_model.decoder.conv_out.weight" in err
