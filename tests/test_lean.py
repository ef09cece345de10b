"""Lean training checkpoints (``core.lean``): a DreamBooth run from a base file saves what changes and a
reference to the base (path and sha256); resume, export and ``load_model`` complete it from the base
and refuse a moved or changed one in one line. (Exact resume through main.py: tests/test_resume.py.)"""
from __future__ import annotations

import hashlib
import os
import shutil
import warnings

import lightning.pytorch as pl
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from core import lean
from core.config import instantiate_from_config
from core.weights import CheckpointError, load_checkpoint
from ldm.export import export, export_weights
from ldm.loading import load_model
from scripts.export import main as export_main
from tests.main_helpers import DREAMBOOTH_TINY, base_checkpoint
from tests.test_dreambooth import CLASS, INSTANCE, part

pytestmark = pytest.mark.filterwarnings("ignore")


def dreambooth_from(base, **params):
    cfg = OmegaConf.load(DREAMBOOTH_TINY)
    cfg.model.params.ckpt_path = str(base) if base is not None else None
    for k, v in params.items():
        OmegaConf.update(cfg, f"model.params.{k}", v)
    model = instantiate_from_config(cfg.model)
    model.learning_rate = 1e-2
    return cfg, model


def fit(model, folder, steps: int = 2, ckpt_path=None) -> pl.Trainer:
    batches = [{"instance": part(1, INSTANCE, i), "class": part(1, CLASS, 9 + i)} for i in range(steps)]
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, train_dataloaders=DataLoader(batches, batch_size=None), ckpt_path=ckpt_path)
    return trainer


@pytest.fixture(scope="module", params=[True, False], ids=["unet+text", "unet"])
def run(request, tmp_path_factory):
    """Two steps of the tiny DreamBooth with EMA from a base file: (folder, base, config, model, lean ckpt)."""
    tmp = tmp_path_factory.mktemp("lean")
    base = base_checkpoint(tmp / "base.ckpt", seed=1)
    cfg, model = dreambooth_from(base, train_text_encoder=request.param, use_ema=True)
    trainer = fit(model, tmp)
    trainer.save_checkpoint(tmp / "lean.ckpt")
    return {"tmp": tmp, "base": base, "cfg": cfg, "model": model.eval(), "ckpt": tmp / "lean.ckpt",
            "trainer": trainer, "text": request.param}


def test_the_checkpoint_holds_what_changes_and_refers_to_the_base(run):
    ckpt, model = load_checkpoint(run["ckpt"]), run["model"]
    full = model.state_dict()
    frozen = {k for k, p in model.named_parameters() if not p.requires_grad}
    assert any(k.startswith("first_stage_model.") for k in frozen)
    assert any(k.startswith("cond_stage_model.") for k in frozen) != run["text"]
    assert set(ckpt["state_dict"]) == set(full) - frozen
    assert any(k.startswith("model_ema.") for k in ckpt["state_dict"])
    for k, v in ckpt["state_dict"].items():
        assert torch.equal(v, full[k]), k
    ref = ckpt[lean.BASE_KEY]
    assert ref["path"] == str(run["base"].resolve()) and set(ref["keys"]) == frozen
    assert ref["sha256"] == hashlib.sha256(run["base"].read_bytes()).hexdigest()
    assert ref["size"] == run["base"].stat().st_size
    assert {"optimizer_states", "lr_schedulers", "loops", "global_step"} <= set(ckpt)


def test_a_run_without_a_base_file_saves_everything(run, tmp_path):
    _, model = dreambooth_from(None)
    fit(model, tmp_path, steps=1).save_checkpoint(tmp_path / "full.ckpt")
    ckpt = load_checkpoint(tmp_path / "full.ckpt")
    assert lean.BASE_KEY not in ckpt and set(ckpt["state_dict"]) == set(model.state_dict())


def test_resume_restores_the_frozen_weights_from_the_base(run):
    _, fresh = dreambooth_from(None, train_text_encoder=run["text"], use_ema=True)  # a resumed run: no ckpt_path
    trainer = fit(fresh, run["tmp"], steps=3, ckpt_path=run["ckpt"])
    assert trainer.global_step == 3 and fresh.base_path == str(run["base"].resolve())
    base = load_checkpoint(run["base"])["state_dict"]
    for k in load_checkpoint(run["ckpt"])[lean.BASE_KEY]["keys"]:
        assert torch.equal(fresh.state_dict()[k], base[k]), k
    trainer.save_checkpoint(run["tmp"] / "resumed.ckpt")
    assert load_checkpoint(run["tmp"] / "resumed.ckpt")[lean.BASE_KEY] == load_checkpoint(run["ckpt"])[lean.BASE_KEY]


@pytest.mark.parametrize("ema", [True, False])
def test_export_of_the_lean_checkpoint_equals_the_export_of_the_full_model(run, tmp_path, ema):
    _, ours = export(run["ckpt"], tmp_path / "lean.safetensors", ema=ema)
    full = {k: v.detach() for k, v in run["model"].state_dict().items()}
    _, reference = export_weights(full, "the model", tmp_path / "full.safetensors", {}, ema=ema)
    assert ours.keys() == reference.keys()
    for k, v in ours.items():
        assert torch.equal(v, reference[k]), k


def test_load_model_reads_the_lean_checkpoint(run):
    loaded = load_model(run["cfg"], run["ckpt"])
    for (k, a), b in zip(loaded.state_dict().items(), run["model"].state_dict().values()):
        assert torch.equal(a, b), k


def test_a_moved_or_changed_base_is_one_line(run, tmp_path):
    moved = tmp_path / "moved.ckpt"
    shutil.copyfile(run["ckpt"], moved)
    ckpt = load_checkpoint(moved)
    gone = {**ckpt, lean.BASE_KEY: {**ckpt[lean.BASE_KEY], "path": str(tmp_path / "nowhere.ckpt")}}
    torch.save(gone, moved)
    with pytest.raises(CheckpointError, match=r"nowhere.ckpt are not there \(moved or deleted\?\)") as err:
        export(moved, tmp_path / "a.safetensors")
    assert "moved.ckpt" in str(err.value) and "\n" not in str(err.value)
    other = base_checkpoint(tmp_path / "other.ckpt", seed=2)
    torch.save({**ckpt, lean.BASE_KEY: {**ckpt[lean.BASE_KEY], "path": str(other)}}, moved)
    for read in (lambda: export(moved, tmp_path / "b.safetensors"), lambda: load_model(run["cfg"], moved),
                 lambda: fit(dreambooth_from(None, train_text_encoder=run["text"], use_ema=True)[1], tmp_path,
                             steps=3, ckpt_path=moved)):
        with pytest.raises(CheckpointError, match="other.ckpt have changed") as err:
            read()
        assert "\n" not in str(err.value)
    assert not list(tmp_path.glob("*.safetensors"))


def test_a_moved_base_is_given_by_its_new_place(run, tmp_path):
    """The recorded base is gone; export, load_model, the scripts and resume take its new place (same
    content), and refuse a file of other content given there, in one line."""
    moved_ckpt = tmp_path / "lean.ckpt"
    ckpt = load_checkpoint(run["ckpt"])
    torch.save({**ckpt, lean.BASE_KEY: {**ckpt[lean.BASE_KEY], "path": str(tmp_path / "was-here.ckpt")}}, moved_ckpt)
    new_place = tmp_path / "elsewhere" / "base.ckpt"
    new_place.parent.mkdir()
    shutil.copyfile(run["base"], new_place)
    with pytest.raises(CheckpointError, match="--base_weights FILE"):
        export(moved_ckpt, tmp_path / "no.safetensors")
    _, ours = export(moved_ckpt, tmp_path / "a.safetensors", base=new_place)
    _, reference = export(run["ckpt"], tmp_path / "b.safetensors")
    assert all(torch.equal(v, reference[k]) for k, v in ours.items()) and ours.keys() == reference.keys()
    loaded = load_model(run["cfg"], moved_ckpt, base=new_place)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), run["model"].state_dict().values()))
    assert export_main([str(moved_ckpt), str(tmp_path / "c.safetensors"), "--base_weights", str(new_place)]) == 0

    _, fresh = dreambooth_from(None, train_text_encoder=run["text"], use_ema=True)
    fresh.set_base_weights(str(new_place))  # what main.py -r LOGDIR --actual_resume NEW_PLACE does
    trainer = fit(fresh, tmp_path, steps=3, ckpt_path=moved_ckpt)
    assert trainer.global_step == 3 and fresh.base_path == str(new_place)
    trainer.save_checkpoint(tmp_path / "resumed.ckpt")  # the run's next checkpoints refer to the new place
    assert load_checkpoint(tmp_path / "resumed.ckpt")[lean.BASE_KEY]["path"] == str(new_place.resolve())

    other = base_checkpoint(tmp_path / "other.ckpt", seed=2)
    for read in (lambda: export(moved_ckpt, tmp_path / "d.safetensors", base=other),
                 lambda: load_model(run["cfg"], moved_ckpt, base=other)):
        with pytest.raises(CheckpointError, match="other.ckpt are not those it was trained from") as err:
            read()
        assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="is complete"):
        export(run["base"], tmp_path / "e.safetensors", base=new_place)


def test_the_hash_is_computed_once_per_file_version(tmp_path, monkeypatch):
    path = tmp_path / "w.bin"
    path.write_bytes(b"abc")
    calls = []
    monkeypatch.setattr(lean, "_hash_file", lambda p: calls.append(p) or hashlib.sha256(p.read_bytes()).hexdigest())
    assert lean.file_sha256(path) == lean.file_sha256(tmp_path / "." / "w.bin") == hashlib.sha256(b"abc").hexdigest()
    assert len(calls) == 1
    path.write_bytes(b"abd")
    os.utime(path, ns=(1, 1))
    assert lean.file_sha256(path) == hashlib.sha256(b"abd").hexdigest() and len(calls) == 2


def test_main_relocates_the_base_of_a_resumed_run_or_says_why_not(run, tmp_path):
    from core.trainer import relocate_base
    _, model = dreambooth_from(None, train_text_encoder=run["text"])
    relocate_base(model, str(run["base"]))
    assert model.base_override == str(run["base"])
    with pytest.raises(CheckpointError, match="--actual_resume .*nowhere.ckpt: checkpoint file not found"):
        relocate_base(model, str(tmp_path / "nowhere.ckpt"))
    with pytest.raises(ValueError, match="Linear is not trained from a base file"):
        relocate_base(torch.nn.Linear(1, 1), str(run["base"]))
