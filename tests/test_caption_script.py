"""scripts/caption.py end to end on a tiny random BLIP-2 folder and a folder of awkward images."""
from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blip2 import Blip2OPT
from blip2.captioning import batches, collect_inputs, load_batch
from blip2.processors import Blip2ImageProcessor
from tests.blip2_fixtures import make_tiny_blip2_folder

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "caption.py"
GEN = {"num_beams": 3, "max_new_tokens": 6, "min_new_tokens": 2, "num_return_sequences": 2}
GEN_FLAGS = [arg for k, v in GEN.items() for arg in (f"--{k}", str(v))]
GOOD = ["alpha.png", "deep.png", "grey.jpg", "nested/inner/photo.jpg"]


def _images(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    (folder / "nested" / "inner").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (30, 40, 4), dtype=np.uint8), "RGBA").save(folder / "alpha.png")
    Image.fromarray(rng.integers(0, 65536, (33, 31)).astype(np.uint16)).save(folder / "deep.png")
    Image.fromarray(rng.integers(0, 256, (50, 20), dtype=np.uint8), "L").save(folder / "grey.jpg")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "nested/inner/photo.jpg")
    data = (folder / "nested/inner/photo.jpg").read_bytes()
    (folder / "broken.jpg").write_bytes(data[: len(data) // 3])
    (folder / "readme.md").write_text("not an image, ignored by extension")
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("caption")
    model_dir = make_tiny_blip2_folder(root / "model")
    return model_dir, _images(root / "images"), root


def _expected(model_dir: Path, inputs: list[Path], batch_size: int, call) -> list[tuple[str, list[str]]]:
    """What ``Blip2OPT`` returns in-process for the readable images, batched as the script does."""
    model, processor = Blip2OPT.from_pretrained(model_dir), Blip2ImageProcessor.from_folder(model_dir)
    out = []
    for chunk in batches(collect_inputs(inputs), batch_size):
        good, images, _ = load_batch(chunk)
        texts = call(model, processor(images))
        n = len(texts) // len(good)
        out += [(str(p), texts[i * n:(i + 1) * n]) for i, p in enumerate(good)]
    return out


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def _main():
    spec = importlib.util.spec_from_file_location("caption_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _skipped_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.replace("\r", "\n").splitlines() if ln.startswith("skipped:")]


def test_captions_jsonl_and_sidecars(world):
    model_dir, images, root = world
    out = root / "captions.jsonl"
    proc = _run(str(images), "--model", str(model_dir), "--prompt", "a photo of", "--batch_size", "3",
                "--sidecar", "--output", str(out), *GEN_FLAGS)
    assert proc.returncode == 1, proc.stderr
    skipped = _skipped_lines(proc.stderr)
    assert len(skipped) == 1 and str(images / "broken.jpg") in skipped[0] and "truncated or corrupt" in skipped[0]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    expected = _expected(model_dir, [images], 3, lambda m, px: m.generate(px, prompt="a photo of", **GEN))
    assert [(r["image"], r["prompt"], r["caption"]) for r in rows] == [
        (path, "a photo of", c) for path, caps in expected for c in caps]
    assert sorted({r["image"] for r in rows}) == [str(images / g) for g in GOOD]
    for path, caps in expected:
        assert Path(path).with_suffix(".txt").read_text() == "\n".join(caps) + "\n"
    assert not (images / "broken.txt").exists()


def test_vqa_csv_from_a_list_file(world, capsys):
    model_dir, images, root = world
    (root / "list.txt").write_text("# images to ask about\nimages/grey.jpg\n\nimages/deep.png\nimages/missing.png\n")
    (root / "questions.txt").write_text("what is it?\nhow many?\n")
    out = root / "answers.csv"
    code = _main()([str(root / "list.txt"), "--model", str(model_dir), "--question", "why?", "--questions",
                    str(root / "questions.txt"), "--output", str(out), "--num_beams", "2", "--max_new_tokens", "4"])
    assert code == 1 and "missing.png: image file not found" in _skipped_lines(capsys.readouterr().err)[0]
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    model, processor = Blip2OPT.from_pretrained(model_dir), Blip2ImageProcessor.from_folder(model_dir)
    good = [images / "grey.jpg", images / "deep.png"]
    pixels = processor(load_batch(good)[1])
    expected = [{"image": str(p), "question": q, "answer": a}
                for q in ["why?", "what is it?", "how many?"]
                for p, a in zip(good, model.answer(pixels, [q] * 2, num_beams=2, max_new_tokens=4))]
    assert rows == expected


def test_config_and_ckpt_give_the_same_captions(world, tmp_path, capsys):
    model_dir, images, _ = world
    config = json.loads((model_dir / "config.json").read_text())
    params = {"config": config, "tokenizer": str(model_dir)}
    yaml = {"model": {"target": "blip2.loading.build_blip2_opt", "params": params}}
    (tmp_path / "c.yaml").write_text(json.dumps(yaml))
    args = [str(images / "grey.jpg"), str(images / "alpha.png"), "--max_new_tokens", "5"]
    assert _main()([*args, "--model", str(model_dir), "--output", str(tmp_path / "a.jsonl")]) == 0
    assert _main()([*args, "--config", str(tmp_path / "c.yaml"), "--ckpt", str(model_dir / "model.safetensors"),
                    "--output", str(tmp_path / "b.jsonl")]) == 0
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    assert len((tmp_path / "a.jsonl").read_text().splitlines()) == 2


def test_lightning_checkpoint_with_its_training_config(world, tmp_path):
    """A ``Blip2OPTFinetune`` checkpoint of main.py (``model.*`` weights) with the config that trained
    it: the captions of the trained weights (the config's pretrained folder only gives the shapes)."""
    import torch

    from blip2.models.finetune import Blip2OPTFinetune

    model_dir, images, _ = world
    module = Blip2OPTFinetune(pretrained=str(model_dir), prompt="a photo of")
    with torch.no_grad():
        module.model.language_projection.weight.mul_(-2.0)  # "trained": unlike the folder's weights
    torch.save({"state_dict": module.state_dict(), "blip2_config": module.blip2_config, "global_step": 3},
               tmp_path / "last.ckpt")
    params = {"pretrained": str(model_dir), "prompt": "a photo of"}
    (tmp_path / "c.yaml").write_text(json.dumps({"model": {"target": "blip2.models.finetune.Blip2OPTFinetune",
                                                           "params": params}}))
    inputs = [images / "grey.jpg", images / "alpha.png"]
    assert _main()([*map(str, inputs), "--config", str(tmp_path / "c.yaml"), "--ckpt", str(tmp_path / "last.ckpt"),
                    "--max_new_tokens", "5", "--output", str(tmp_path / "a.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    pixels = Blip2ImageProcessor.from_folder(model_dir)(load_batch(inputs)[1])
    trained = module.model.eval().generate(pixels, max_new_tokens=5)
    assert [r["caption"] for r in rows] == trained
    assert trained != Blip2OPT.from_pretrained(model_dir).generate(pixels, max_new_tokens=5)


def test_ckpt_of_another_size_is_one_line(world, tmp_path, capsys):
    model_dir, images, _ = world
    preset = {"target": "blip2.config.blip2_opt_2_7b", "params": {"image_size": 364}}
    model = {"target": "blip2.loading.build_blip2_opt", "params": {"config": preset, "tokenizer": str(model_dir)}}
    (tmp_path / "c.yaml").write_text(json.dumps({"model": model}))
    ckpt = model_dir / "model.safetensors"
    assert _main()([str(images), "--config", str(tmp_path / "c.yaml"), "--ckpt", str(ckpt)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"caption.py: error: {ckpt}: does not fit") and "missing keys" in err and "\n" not in err


@pytest.mark.parametrize("args, message", [
    (["{images}", "--model", "{tmp}/nope"], "nope: model folder or checkpoint not found"),
    (["{images}", "--lavis", "{tmp}/x.pth"], "--lavis needs --opt"),
    (["{images}", "--model", "{model}", "--opt", "{model}"], "--vit and --opt belong to --lavis"),
    (["{tmp}", "--model", "{model}"], "no images found in"),
    (["{tmp}/absent.jpg", "--model", "{model}"], "absent.jpg: no such image"),
    (["{images}", "--ckpt", "{tmp}/c.ckpt"], "--ckpt needs --config"),
    (["{images}", "--model", "{model}", "--config", "{tmp}/c.yaml"], "--config needs --ckpt"),
    (["{images}", "--model", "{model}", "--question", "q", "--sidecar"], "--sidecar writes captions"),
    (["{images}", "--model", "{model}", "--base_weights", "{model}"], "completes a lean training checkpoint of ours"),
    (["{images}", "--lavis", "{tmp}/x.pth", "--opt", "{model}", "--base_weights", "{model}"],
     "--base_weights completes a lean training checkpoint"),
])
def test_bad_invocations_are_one_line(world, tmp_path, capsys, args, message):
    model_dir, images, _ = world
    argv = [a.format(images=images, tmp=tmp_path, model=model_dir) for a in args]
    assert _main()(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("caption.py: error:") and message in err and "\n" not in err


def _captions(path: Path) -> list[str]:
    return [json.loads(line)["caption"] for line in path.read_text().splitlines()]


def test_a_lightning_checkpoint_goes_in_model_directly(world, tmp_path, capsys):
    """``--model last.ckpt``: the Blip2OPTFinetune checkpoint names its config and tokenizer folder."""
    import torch

    from blip2.models.finetune import Blip2OPTFinetune

    model_dir, images, _ = world
    module = Blip2OPTFinetune(pretrained=str(model_dir), prompt="a photo of")
    with torch.no_grad():
        module.model.language_projection.weight.mul_(-2.0)  # "trained"
    ckpt = {"state_dict": module.state_dict(), "global_step": 3}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "last.ckpt")
    inputs = [images / "grey.jpg", images / "alpha.png"]
    args = [*map(str, inputs), "--max_new_tokens", "5", "--output", str(tmp_path / "a.jsonl")]
    assert _main()([*args, "--model", str(tmp_path / "last.ckpt")]) == 0
    pixels = Blip2ImageProcessor.from_folder(model_dir)(load_batch(inputs)[1])
    trained = module.model.eval().generate(pixels, max_new_tokens=5)
    assert _captions(tmp_path / "a.jsonl") == trained
    assert Blip2OPT.from_pretrained(tmp_path / "last.ckpt").generate(pixels, max_new_tokens=5) == trained
    torch.save({**ckpt, "blip2_tokenizer": str(tmp_path / "gone")}, tmp_path / "moved.ckpt")
    capsys.readouterr()
    assert _main()([*args, "--model", str(tmp_path / "moved.ckpt")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"moved.ckpt: its tokenizer folder {tmp_path / 'gone'} (from training) is gone" in err and "\n" not in err
    assert _main()([*args, "--model", str(tmp_path / "moved.ckpt"), "--tokenizer", str(model_dir)]) == 0
    assert _captions(tmp_path / "a.jsonl") == trained


def test_generation_config_json_gives_the_defaults(world, tmp_path):
    model_dir, images, _ = world
    folder = tmp_path / "model"
    folder.mkdir()
    for f in model_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    defaults = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**defaults, "num_beams": 2, "max_new_tokens": 3}))
    inputs = [images / "grey.jpg", images / "alpha.png"]
    pixels = Blip2ImageProcessor.from_folder(folder)(load_batch(inputs)[1])
    model = Blip2OPT.from_pretrained(folder)
    assert model.generation_defaults["num_beams"] == 2
    out = tmp_path / "a.jsonl"
    assert _main()([*map(str, inputs), "--model", str(folder), "--output", str(out)]) == 0
    assert _captions(out) == model.generate(pixels, num_beams=2, max_new_tokens=3) == model.generate(pixels)
    assert _main()([*map(str, inputs), "--model", str(folder), "--output", str(out), "--max_new_tokens", "6"]) == 0
    assert _captions(out) == model.generate(pixels, num_beams=2, max_new_tokens=6)  # the option wins
    assert _captions(out) != model.generate(pixels, num_beams=2, max_new_tokens=3)


def test_lavis_files_caption_like_the_converted_folder(tmp_path, world, capsys):
    from tests.lavis_fixtures import write_lavis_files, zero_k_bias

    _, images, _ = world
    folder = make_tiny_blip2_folder(tmp_path / "hf", "prepend", seed=4)
    zero_k_bias(folder)
    lavis, vit, opt = write_lavis_files(folder, tmp_path / "lavis")
    params = {"config": json.loads((folder / "config.json").read_text())}  # the tiny architecture
    (tmp_path / "c.yaml").write_text(json.dumps({"model": {"target": "blip2.loading.build_blip2_opt",
                                                           "params": params}}))
    args = [str(images / "grey.jpg"), str(images / "alpha.png"), "--max_new_tokens", "5", "--prompt", "a photo of"]
    assert _main()([*args, "--model", str(folder), "--output", str(tmp_path / "a.jsonl")]) == 0
    assert _main()([*args, "--lavis", str(lavis), "--vit", str(vit), "--opt", str(opt), "--config",
                    str(tmp_path / "c.yaml"), "--output", str(tmp_path / "b.jsonl")]) == 0
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    config = json.loads((opt / "config.json").read_text())
    (opt / "config.json").write_text(json.dumps({**config, "hidden_size": 48}))
    capsys.readouterr()
    assert _main()([*args, "--lavis", str(lavis), "--vit", str(vit), "--opt", str(opt)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"caption.py: error: {opt / 'config.json'}: an OPT of width 48") and "\n" not in err
