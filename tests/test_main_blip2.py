"""main.py drives the BLIP-2 caption fine-tuning config too (not only DreamBooth)."""
import json

from tests.blip2_fixtures import make_tiny_blip2_folder
from tests.main_helpers import read_scalars, run_dirs, run_main
from tests.sd_fixtures import ROOT
from tests.test_blip2_finetune import IMAGE_SIZE, squares


def test_caption_finetuning_through_main(tmp_path):
    folder = make_tiny_blip2_folder(tmp_path / "tiny", "image_tokens", seed=1)
    source = squares(tmp_path / "data", 6, seed=0)
    entries = [{"filepath": "", "filename": r["image"], "split": "train" if i < 4 else "val",
                "sentences": [{"raw": r["caption"]}]}
               for i, r in enumerate(map(json.loads, source.read_text().splitlines()))]
    (tmp_path / "data" / "dataset_coco.json").write_text(json.dumps({"images": entries}))
    res = run_main(["--base", str(ROOT / "configs/blip2/finetune_caption_coco.yaml"), "-t", "--no-test",
                    "-l", str(tmp_path / "logs"), "-n", "coco",
                    f"coco.annotations={tmp_path}/data/dataset_coco.json", f"coco.image_root={tmp_path}/data",
                    f"coco.image_size={IMAGE_SIZE}", f"model.params.pretrained={folder}",
                    "model.params.frozen_dtype=fp32", "model.params.gradient_checkpointing=false",
                    "data.params.batch_size=2", "data.params.num_workers=0",
                    "lightning.trainer.accelerator=cpu", "lightning.trainer.precision=32",
                    "lightning.trainer.max_epochs=1", "lightning.trainer.max_steps=2",
                    "lightning.trainer.limit_val_batches=0", "lightning.trainer.log_every_n_steps=1"],
                   cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    [run] = run_dirs(tmp_path / "logs")
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert "learning rate 1.00e-05 (base_learning_rate, not scaled)" in res.stdout + res.stderr
    assert len(read_scalars(run, "train/loss")) == 2
