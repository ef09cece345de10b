"""benchmarks/toy_run.py: the whole-process toy DreamBooth comparison. Our side runs for real (2 steps);
diffusers' script is not in CI, so a stand-in with its command line and its progress bar plays it."""
import math
import textwrap

import pytest

from benchmarks import toy_run

# the stand-in: reads the script's arguments, checks it was given the class images our sampler made,
# prints a progress bar the way the script's tqdm does, and saves a "UNet"
STAND_IN = textwrap.dedent('''
    import argparse, pathlib, sys
    p = argparse.ArgumentParser()
    for a in ("pretrained_model_name_or_path", "instance_data_dir", "class_data_dir", "instance_prompt", "class_prompt",
              "output_dir", "lr_scheduler"):
        p.add_argument("--" + a)
    for a in ("num_class_images", "max_train_steps", "train_batch_size", "resolution", "lr_warmup_steps",
              "checkpointing_steps", "seed", "dataloader_num_workers"):
        p.add_argument("--" + a, type=int)
    p.add_argument("--learning_rate", type=float); p.add_argument("--prior_loss_weight", type=float)
    p.add_argument("--mixed_precision")
    for a in ("with_prior_preservation", "center_crop", "train_text_encoder"):
        p.add_argument("--" + a, action="store_true")
    a = p.parse_args()
    assert pathlib.Path(a.pretrained_model_name_or_path, "unet", "config.json").is_file()
    assert len(list(pathlib.Path(a.class_data_dir).glob("*.png"))) == a.num_class_images
    assert a.with_prior_preservation and a.train_text_encoder and a.train_batch_size == 4 and a.resolution == 32
    n = a.max_train_steps
    for i in range(1, n + 1):
        sys.stderr.write(f"\\rSteps: {100 * i // n}%|##| {i}/{n} [00:01<00:00,  4.81it/s, loss=0.{i}, lr=1e-05]")
    out = pathlib.Path(a.output_dir, "unet"); out.mkdir(parents=True)
    (out / "diffusion_pytorch_model.safetensors").write_bytes(b"stand-in")
''')


def test_bars_of_both_sides_are_read():
    ours = ("train:  50%|#####     | 150/300 [00:20<00:20,  7.1it/s, train/loss_instance=0.2, train/loss=0.3]\r"
            "train: 100%|██████████| 300/300 [01:02<00:00,  4.81it/s, train/loss_instance=0.00951, "
            "train/loss_class=0.1, train/loss=0.0437]")
    assert toy_run.last_bar(ours, "train", "train/loss") == (300, 62.0, 0.0437)
    script = "Steps: 100%|██████████| 300/300 [1:00:05<00:00,  4.81it/s, loss=0.162, lr=1e-5]"
    assert toy_run.last_bar(script, "Steps", "loss") == (300, 3605.0, 0.162)
    assert toy_run.last_bar(script, "train", "train/loss") is None


def test_a_run_that_did_less_or_diverged_is_an_error(tmp_path):
    saved = tmp_path / "model.safetensors"
    saved.write_bytes(b"x")
    bar = "Steps: 100%|#| {n}/{n} [00:10<00:00,  1it/s, loss={loss}]"
    run = toy_run.checked_run(bar.format(n=5, loss="0.5"), 12.0, 2**20, "Steps", "loss", 5, saved, "script")
    assert (run.steps, run.loop_s, run.loss, run.wall_s) == (5, 10.0, 0.5, 12.0)
    with pytest.raises(RuntimeError, match="expected 5 steps in its progress bar, found 4"):
        toy_run.checked_run(bar.format(n=4, loss="0.5"), 12.0, 0, "Steps", "loss", 5, saved, "script")
    with pytest.raises(RuntimeError, match="its last loss is nan"):
        toy_run.checked_run(bar.format(n=5, loss="nan"), 12.0, 0, "Steps", "loss", 5, saved, "script")
    with pytest.raises(RuntimeError, match="saved model .* is missing"):
        toy_run.checked_run(bar.format(n=5, loss="0.5"), 12.0, 0, "Steps", "loss", 5, tmp_path / "no", "script")


def test_ours_runs_for_real_beside_the_stand_in_and_the_table_has_the_ratios(tmp_path, capsys, monkeypatch):
    script = tmp_path / "train_dreambooth.py"
    script.write_text(STAND_IN)
    shipped = next(iter(toy_run.OURS))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the child processes
    assert toy_run.main(["--script", str(script), "--steps", "2", "--repeats", "1", "--num_class_images", "4",
                         "--variants", shipped, "--workdir", str(tmp_path / "work"),
                         "--out", str(tmp_path / "table.md")]) == 0
    table = (tmp_path / "table.md").read_text()
    lines = table.splitlines()
    body = lines[lines.index(next(l for l in lines if l.startswith("|---"))) + 1:]
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in body}
    assert set(rows) == {shipped, toy_run.SCRIPT}
    assert rows[toy_run.SCRIPT][1].endswith("(1.00)") and rows[toy_run.SCRIPT][4] == "0.2000"
    ours_loss = float(rows[shipped][4])
    assert math.isfinite(ours_loss) and ours_loss > 0
    assert len(list((tmp_path / "work" / "class_images").glob("*.png"))) == 4
    assert "Toy DreamBooth, 2 steps of 4 + 4 images" in capsys.readouterr().out
