"""Bad input, case by case (issue 13): every entry point answers one line on stderr naming the file or
key, exit status 2, no traceback, nothing written that a later run would trust, nothing that existed
overwritten. Each case builds its input in a fresh folder and runs the entry point in process.
(Some cases are also covered, with more detail, beside the feature they concern.)"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from core import trainer as main_module
from core.weights import save_checkpoint
from scripts import caption as caption_script
from scripts import export as export_script
from scripts import retrieve as retrieve_script
from scripts import sample as sample_script
from blip2.hub import TOKENIZER_FILES
from tests.blip2_fixtures import make_tiny_blip2_folder
from tests.main_helpers import DREAMBOOTH_TINY, base_checkpoint, make_images
from tests.sd_fixtures import TINY_CONFIG, tiny_model


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    ckpt = root / "tiny.ckpt"
    torch.save({"state_dict": tiny_model(seed=7).state_dict()}, ckpt)
    return SimpleNamespace(root=root, ckpt=ckpt, base=base_checkpoint(root / "base.ckpt"),
                           images=make_images(root / "images", 2), blip2=make_tiny_blip2_folder(root / "blip2"))


class Payload:
    """A pickle whose loading would run code: it creates the file named at pickling time."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def png(path: Path, size=(40, 48), mode="RGB", array=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (Image.fromarray(array) if array is not None else Image.new(mode, size, 128 if mode == "L" else (90, 30, 200)))\
        .save(path)
    return path


# ---- the cases: (name, build(world, tmp) -> (entry point, argv), expected text) ------------------------
def train(w, tmp, *extra, data=None):
    return main_module.main, ["-t", "--base", str(DREAMBOOTH_TINY), "--actual_resume", str(w.base),
                              "--data_root", str(data or w.images), "-l", str(tmp / "logs"), *extra]


def sample(w, tmp, *extra, ckpt=None):
    return sample_script.main, ["--config", str(TINY_CONFIG), "--ckpt", str(ckpt or w.ckpt), "--device", "cpu",
                                "--precision", "full", "--H", "8", "--W", "8", "--ddim_steps", "2",
                                "--n_samples", "1", "--n_iter", "1", "--outdir", str(tmp / "out"), *extra]


def export(w, tmp, src, out=None, *extra):
    (tmp / "out").mkdir(exist_ok=True)
    return export_script.main, [str(src), str(out or tmp / "out" / "x.safetensors"), *extra]


def caption(w, tmp, *extra, model=None, images=None):
    (tmp / "out").mkdir(exist_ok=True)
    return caption_script.main, [str(images or w.images), "--model", str(model or w.blip2), "--max_new_tokens", "2",
                                 "--output", str(tmp / "out" / "c.jsonl"), *extra]


def retrieve(w, tmp, *extra):
    return retrieve_script.main, ["--images", str(w.images), "--texts", "a dog", "--device", "cpu", *extra]


def lavis_stage1(tmp):
    """A LAVIS stage-1 file (``{"model": ...}``) without the ViT, as ``blip2_pretrained.pth`` is."""
    path = tmp / "blip2_pretrained.pth"
    torch.save({"model": {"query_tokens": torch.zeros(1, 2, 4)}}, path)
    return path


def yaml(tmp, text):
    return write(tmp / "c.yaml", text.encode())


def truncated(path: Path, src: Path, keep: float = 0.5) -> Path:
    data = src.read_bytes()
    return write(path, data[:int(len(data) * keep)])


def blip2_without(w, tmp, name, edit=None):
    """The tiny BLIP-2 folder without ``name`` (a file, or a tuple of files), or with it edited."""
    folder = tmp / "model"
    folder.mkdir()
    for f in w.blip2.iterdir():
        if f.name not in ((name,) if isinstance(name, str) else name):
            os.symlink(f, folder / f.name)
    if edit is not None:
        import json
        config = json.loads((w.blip2 / name).read_text())
        edit(config)
        (folder / name).write_text(json.dumps(config))
    return folder


def _cmyk_and_16bit(tmp):
    png(tmp / "d" / "a.png", array=(np.random.default_rng(0).random((40, 48)) * 65535).astype(np.uint16))
    Image.new("CMYK", (40, 48), (10, 20, 30, 40)).save(tmp / "d" / "b.jpg")
    png(tmp / "d" / "c.png", mode="RGBA")
    return tmp / "d"


def _symlink_loop(tmp):
    d = png(tmp / "d" / "a.png").parent
    os.symlink(d, d / "loop")
    return d


CASES = [
    # configs
    ("config file missing", lambda w, t: train(w, t, "--base", str(t / "none.yaml")), "none.yaml: config file not found"),
    ("YAML syntax error", lambda w, t: train(w, t, "--base", str(yaml(t, "model: [unclosed\n"))),
     "not a readable YAML config"),
    ("unknown target", lambda w, t: train(w, t, "model.target=ldm.nowhere.Model"), "cannot import target 'ldm.nowhere.Model'"),
    ("target outside the project", lambda w, t: train(w, t, "model.target=os.system"),
     "target 'os.system': not a class of this project"),
    ("wrong parameter type", lambda w, t: train(w, t, "model.params.unet_config.params.model_channels=abc"),
     "model_channels='abc' is not int"),
    ("unknown model parameter", lambda w, t: train(w, t, "model.params.prior_los_weight=1.0"),
     "unexpected keyword argument 'prior_los_weight'"),
    ("unknown trainer key", lambda w, t: train(w, t, "lightning.trainer.max_step=3"),
     "lightning.trainer.max_step: not an argument of lightning's Trainer"),
    ("zero learning rate", lambda w, t: train(w, t, "model.base_learning_rate=0"), "base_learning_rate=0: expected a number > 0"),
    ("negative learning rate", lambda w, t: train(w, t, "model.base_learning_rate=-1e-4"), "expected a number > 0"),
    ("max_steps 0", lambda w, t: train(w, t, "lightning.trainer.max_steps=0"), "max_steps=0: expected a positive number"),
    ("max_steps not a number", lambda w, t: train(w, t, "lightning.trainer.max_steps=abc"), "max_steps='abc' is not int"),
    # data
    ("empty data folder", lambda w, t: train(w, t, data=(t / "empty").mkdir() or t / "empty"), "holds no images"),
    ("only non-images", lambda w, t: train(w, t, data=write(t / "d" / "notes.txt", b"hi").parent), "holds no images"),
    ("truncated JPEG", lambda w, t: train(w, t, data=truncated(t / "d" / "a.jpg", png(t / "x.jpg")).parent),
     "a.jpg: truncated or corrupt image"),
    ("0-byte PNG", lambda w, t: train(w, t, data=write(t / "d" / "a.png", b"").parent), "a.png: not an image"),
    ("1x1 image", lambda w, t: train(w, t, data=png(t / "d" / "a.png", size=(1, 1)).parent),
     "a.png: 1x1 pixels, too small for resolution=32"),
    ("data folder missing", lambda w, t: train(w, t, data=t / "absent"), "absent: no such folder"),
    # checkpoints
    ("base checkpoint missing", lambda w, t: train(w, t, "--actual_resume", str(t / "no.ckpt")), "no.ckpt: checkpoint file not found"),
    ("empty .ckpt", lambda w, t: sample(w, t, ckpt=write(t / "e.ckpt", b"")), "e.ckpt"),
    ("truncated .ckpt", lambda w, t: sample(w, t, ckpt=truncated(t / "t.ckpt", w.ckpt)), "t.ckpt"),
    ("truncated .safetensors", lambda w, t: sample(w, t, ckpt=truncated(
        t / "t.safetensors", save_checkpoint(tiny_model().state_dict(), t / "full.safetensors"))), "t.safetensors"),
    ("wrong shapes", lambda w, t: sample(w, t, ckpt=save_checkpoint(
        {"state_dict": {**tiny_model().state_dict(), "betas": torch.zeros(3)}}, t / "s.ckpt")), "wrong shapes 1 (betas"),
    ("another model's file", lambda w, t: sample(w, t, ckpt=w.blip2 / "model.safetensors"), "model.safetensors"),
    ("code-carrying pickle (sample.py)", lambda w, t: sample(w, t, ckpt=write(
        t / "evil.ckpt", pickle.dumps(Payload(t / "ran")))), "evil.ckpt"),
    ("code-carrying pickle (main.py base)", lambda w, t: train(w, t, "--actual_resume", str(write(
        t / "evil.ckpt", pickle.dumps(Payload(t / "ran"))))), "evil.ckpt"),
    ("code-carrying pickle (export.py)", lambda w, t: export(w, t, write(t / "evil.ckpt", pickle.dumps(Payload(t / "ran")))),
     "evil.ckpt"),
    # command lines
    ("unknown flag", lambda w, t: sample(w, t, "--sedd", "1"), "unrecognized arguments: --sedd"),
    ("-n with -r", lambda w, t: (main_module.main, ["-r", str(t), "-n", "x"]), "-n/--name and -r/--resume cannot be combined"),
    ("H not a multiple of 8", lambda w, t: sample(w, t, "--H", "30"), "--H 30 must be a positive multiple of 4"),
    ("zero samples", lambda w, t: sample(w, t, "--n_samples", "0"), "--n_samples 0: expected a positive integer"),
    ("negative steps", lambda w, t: sample(w, t, "--ddim_steps", "-3"), "--ddim_steps -3: expected a positive integer"),
    ("empty prompt", lambda w, t: sample(w, t, "--prompt", ""), "--prompt is empty"),
    ("500-word prompt", lambda w, t: sample(w, t, "--prompt", " ".join(["corgi"] * 500)), "prompt 1 is 500 tokens"),
    ("non-UTF-8 prompt file", lambda w, t: sample(w, t, "--from-file", str(write(t / "p.txt", b"a dog\n\xff\xfe\n"))),
     "p.txt: line 2 is not UTF-8 text"),
    # BLIP-2 folders
    ("BLIP-2 config.json without a key", lambda w, t: caption(w, t, model=blip2_without(
        w, t, "config.json", lambda c: c["vision_config"].pop("hidden_size"))),
     "config.json leaves sizes to transformers' defaults: vision_config.hidden_size=1408"),
    ("BLIP-2 folder without tokenizer files", lambda w, t: caption(w, t, model=blip2_without(
        w, t, TOKENIZER_FILES)), "the model has no tokenizer"),
    ("two images, one caption file", lambda w, t: caption(w, t, "--sidecar", images=png(
        t / "d" / "x.jpg").parent if png(t / "d" / "x.png") else None), "would both write"),
    ("a hand-written caption would be replaced", lambda w, t: caption(w, t, "--sidecar", images=write(
        png(t / "d" / "x.png").with_suffix(".txt"), b"my caption").parent), "x.txt exists"),
    # LAVIS files for retrieval
    ("retrieve --lavis without --vit", lambda w, t: retrieve(w, t, "--lavis", str(lavis_stage1(t)), "--tokenizer", str(t)),
     "holds no ViT (visual_encoder.*): give the EVA"),
    ("retrieve --lavis of our own checkpoint", lambda w, t: retrieve(w, t, "--lavis", str(w.ckpt), "--vit", str(w.ckpt),
                                                                     "--tokenizer", str(t)), "not a LAVIS checkpoint"),
    ("retrieve --vit of another file", lambda w, t: retrieve(w, t, "--lavis", str(lavis_stage1(t)), "--vit",
                                                             str(w.ckpt), "--tokenizer", str(t)), "tiny.ckpt"),
    ("retrieve --lavis without a tokenizer", lambda w, t: retrieve(w, t, "--lavis", str(lavis_stage1(t)), "--vit",
                                                                   str(w.ckpt)), "--lavis needs --tokenizer"),
    # export targets
    ("export into a missing folder", lambda w, t: export(w, t, w.ckpt, t / "no" / "x.safetensors"), "does not exist"),
    ("export over an existing file", lambda w, t: export(w, t, w.ckpt, write(t / "x.safetensors", b"keep")),
     "the file exists (pass --overwrite"),
    ("export over its input", lambda w, t: export(w, t, w.ckpt, w.ckpt, "--overwrite"), "is the input file"),
]


@pytest.mark.parametrize("build, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(world, tmp_path, capsys, build, expected):
    entry, argv = build(world, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = entry(argv)
    except SystemExit as stop:  # argparse's usage errors exit from inside the parser
        code = stop.code
    finally:
        torch.set_num_threads(threads)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(err) == 1 and expected in err[0] and "Traceback" not in err[0], err
    assert not (tmp_path / "ran").exists()  # no payload ran
    assert not any(p.is_file() for p in (tmp_path / "out").rglob("*"))  # no output, no log dir with files in it
    assert not any(p.is_file() for p in (tmp_path / "logs").rglob("*")), list((tmp_path / "logs").rglob("*"))
    for p, mtime in before.items():  # nothing that existed was overwritten
        assert p.stat().st_mtime_ns == mtime, p


def test_there_are_at_least_40_cases():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


def test_hard_but_valid_images_are_read(tmp_path):
    """CMYK, 16-bit and alpha images, unicode and spaces in paths, a symlink loop and a 10000x10000 image
    are not errors: they are read as 8-bit RGB (and resized), and the loop is not followed."""
    from ldm.data.personalized import PersonalizedBase
    folder = _cmyk_and_16bit(tmp_path / "héllo wörld 🐶")
    assert len(PersonalizedBase(str(folder), resolution=16, repeats=1)) == 3
    assert {PersonalizedBase(str(folder), resolution=16, repeats=1)[i]["image"].shape for i in range(3)} == {(16, 16, 3)}
    loop = _symlink_loop(tmp_path / "loop")
    assert len(PersonalizedBase(str(loop), resolution=16, repeats=1)) == 1
    big = tmp_path / "big"
    big.mkdir()
    Image.new("L", (10000, 10000), 7).save(big / "big.png")
    item = PersonalizedBase(str(big), resolution=16, repeats=1)[0]
    assert item["image"].shape == (16, 16, 3) and np.isfinite(item["image"]).all()
