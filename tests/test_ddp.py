"""DDP with 2 CPU processes (gloo) through main.py: one run folder, class images split across the
ranks (each generated once), each rank its own data shard, identical weights at the end."""
from __future__ import annotations

import json

import pytest
import torch

from core.weights import load_checkpoint
from core.images import list_images
from tests.main_helpers import DREAMBOOTH_TINY, base_checkpoint, make_images, run_dirs, run_main

STEPS, CLASS_IMAGES = 2, 3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    inst, base = make_images(tmp / "instance", 4), base_checkpoint(tmp / "base.ckpt")
    proc = run_main(["--base", str(DREAMBOOTH_TINY), "-t", "--actual_resume", str(base), "--data_root", str(inst),
                     "--reg_data_root", str(tmp / "reg"), "--class_word", "dog", "-l", str(tmp / "logs"),
                     "lightning.trainer.strategy=ddp", "lightning.trainer.accelerator=cpu",
                     "lightning.trainer.devices=2", f"lightning.trainer.max_steps={STEPS}",
                     f"dreambooth.num_class_images={CLASS_IMAGES}", "data.params.train.params.repeats=1",
                     "lightning.callbacks.image_logger=null",
                     "lightning.callbacks.class_images.target=tests.main_helpers.RecordingClassImageSampler",
                     f"lightning.callbacks.class_images.params.record_dir={tmp / 'generated'}",
                     "lightning.callbacks.record.target=tests.main_helpers.RankRecorder",
                     f"lightning.callbacks.record.params.folder={tmp / 'ranks'}"], tmp)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"tmp": tmp, "proc": proc}


def test_one_run_folder_and_a_checkpoint(run):
    (d,) = run_dirs(run["tmp"] / "logs")
    assert load_checkpoint(d / "checkpoints" / "last.ckpt")["global_step"] == STEPS


def test_class_images_split_across_ranks(run):
    done = [json.loads((run["tmp"] / "generated" / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(done) and not set(done[0]) & set(done[1])
    assert sorted(done[0] + done[1]) == list(range(CLASS_IMAGES))
    assert len(list_images(run["tmp"] / "reg")) == CLASS_IMAGES


def test_ranks_train_on_their_own_shards_and_end_with_equal_weights(run):
    ranks = [torch.load(run["tmp"] / "ranks" / f"rank{r}.pt") for r in range(2)]
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"]) == STEPS
    assert all(a != b for a, b in zip(ranks[0]["batches"], ranks[1]["batches"]))
    (a, b) = (r["state_dict"] for r in ranks)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
