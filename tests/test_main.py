"""main.py end to end (a subprocess DreamBooth run on the tiny config) and its bad inputs."""
from __future__ import annotations

import re

import pytest
import torch
from omegaconf import OmegaConf

from core import trainer as main
from core.weights import load_checkpoint
from core.images import list_images
from tests.main_helpers import (DREAMBOOTH_TINY, base_checkpoint, make_images, read_scalars, run_dirs, run_main,
                                start_main)

STEPS, CLASS_IMAGES = 2, 2


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("main")
    return {"tmp": tmp, "instance": make_images(tmp / "instance", 2), "base": base_checkpoint(tmp / "base.ckpt")}


@pytest.fixture(scope="module")
def run(files):
    """One training run; a bad --resume runs beside it (the real CLI's exit status and stderr)."""
    tmp = files["tmp"]
    bad = start_main(["-r", str(tmp / "nowhere"), "-t"], tmp)
    proc = run_main(["--base", str(DREAMBOOTH_TINY), "-t", "--actual_resume", str(files["base"]),
                     "--data_root", str(files["instance"]), "--reg_data_root", str(tmp / "reg"),
                     "--class_word", "dog", "-n", "e2e", "-l", str(tmp / "logs"),
                     f"lightning.trainer.max_steps={STEPS}", f"dreambooth.num_class_images={CLASS_IMAGES}",
                     "lightning.callbacks.image_logger.params.every_n_steps=1", "notes.free_form=kept"], tmp,
                    warnings=True)
    bad_out = bad.communicate(timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"proc": proc, "dir": run_dirs(tmp / "logs")[0], "bad": (bad.returncode, bad_out[1])}


def test_run_folder_layout(run):
    d = run["dir"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d_e2e", d.name)
    assert {p.name for p in d.iterdir()} >= {"checkpoints", "configs", "images", "tensorboard"}


def test_class_images_were_generated(run, files):
    assert len(list_images(files["tmp"] / "reg")) == CLASS_IMAGES


def test_checkpoint_holds_the_full_training_state_in_sd_v1_layout(run):
    ckpt = load_checkpoint(run["dir"] / "checkpoints" / "last.ckpt")  # weights_only=True
    assert ckpt["global_step"] == STEPS
    assert any(k.startswith("model.diffusion_model.") for k in ckpt["state_dict"])
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in ckpt["state_dict"])
    assert ckpt["optimizer_states"] and "loops" in ckpt and "DreamBoothDataModule" in ckpt
    assert ckpt["callbacks"]["ResumableCheckpoint"]["rng"][0]["torch"].dtype == torch.uint8
    assert (run["dir"] / "checkpoints" / f"step-{STEPS:06d}.ckpt").samefile(run["dir"] / "checkpoints" / "last.ckpt")


def test_losses_logged_to_tensorboard_and_progress_bar(run):
    for tag in ("train/loss", "train/loss_instance", "train/loss_class"):
        assert sorted(read_scalars(run["dir"], tag)) == list(range(STEPS)), tag
    assert "train/loss" in run["proc"].stdout + run["proc"].stderr


def test_the_console_shows_what_a_user_needs_and_no_library_noise(run):
    """Class-image progress, one bar counting optimizer steps of max_steps (not "Epoch 0/-2"), the
    losses, the trained parameters and where the outputs went; no tips, warnings or deprecations."""
    out = run["proc"].stdout + run["proc"].stderr
    lines = [line.strip() for chunk in out.splitlines() for line in chunk.split("\r") if line.strip()]
    assert any(line.startswith("class images:") and f"{CLASS_IMAGES}/{CLASS_IMAGES}" in line for line in lines)
    bars = [line for line in lines if line.startswith("train:")]
    assert bars and f"{STEPS}/{STEPS}" in bars[-1] and "train/loss=" in bars[-1] and "v_num" not in bars[-1]
    assert re.search(r"^parameters: [\d.]+ [kM]? ?trained of [\d.]+ [kM]", out, re.M)
    assert f"outputs: {run['dir']}/ (checkpoints/" in out and "images/step-000002/grid.png" in out
    noise = [line for line in lines if re.search(r"Tip|[Ww]arning|deprecat|Epoch|TPU available", line)]
    assert not noise, noise


def test_a_stop_signal_before_training_or_after_the_last_save_is_one_line(files):
    """SIGTERM where no callback is obeying signals (before the class images; after the final save):
    exit 1 with one line saying what was kept, never a silent -15."""
    tmp = files["tmp"]
    procs = {hook: start_main(["--base", str(DREAMBOOTH_TINY), "-t", "--actual_resume", str(files["base"]),
                               "--data_root", str(files["instance"]), "--reg_data_root", str(tmp / f"reg_{hook}"),
                               "--class_word", "dog", "-n", hook, "-l", str(tmp / f"logs_{hook}"),
                               "lightning.trainer.max_steps=1", "dreambooth.num_class_images=1",
                               "lightning.callbacks.image_logger=null",
                               "lightning.callbacks.signal.target=tests.main_helpers.SignalInHook",
                               f"lightning.callbacks.signal.params.hook={hook}"], tmp)
             for hook in ("setup", "teardown")}
    outs = {hook: (p.communicate(timeout=300)[1], p.returncode) for hook, p in procs.items()}
    err, code = outs["setup"]
    assert code == 1 and err.strip().splitlines()[-1] == (
        "main.py: stopped: SIGTERM received before training started: nothing was saved"), err[-2000:]
    assert not (tmp / "logs_setup").exists() or not list((tmp / "logs_setup").iterdir())
    assert not (tmp / "reg_setup").exists() or not list_images(tmp / "reg_setup")
    err, code = outs["teardown"]
    last = run_dirs(tmp / "logs_teardown")[0] / "checkpoints" / "last.ckpt"
    assert code == 1 and err.strip().splitlines()[-1] == (
        f"main.py: stopped: SIGTERM received outside the training steps: {last} is complete; "
        f"continue with main.py -r {last.parent.parent} -t"), err[-2000:]
    assert load_checkpoint(last)["global_step"] == 1
    assert "Traceback" not in outs["setup"][0] + outs["teardown"][0]


def test_samples_logged(run):
    grids = sorted((run["dir"] / "images").glob("step-*/grid.png"))
    assert [g.parent.name for g in grids] == [f"step-{s:06d}" for s in range(1, STEPS + 1)]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = next((run["dir"] / "tensorboard").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events), size_guidance={"images": 0})
    acc.Reload()
    assert "samples" in acc.Tags()["images"]


def test_merged_config_saved(run, files):
    saved = list((run["dir"] / "configs").glob("*-project.yaml"))
    assert len(saved) == 1
    cfg = OmegaConf.load(saved[0])
    assert cfg.dreambooth.class_word == "dog" and cfg.dreambooth.data_root == str(files["instance"])
    assert cfg.model.params.ckpt_path == str(files["base"])
    assert cfg.lightning.trainer.max_steps == STEPS and cfg.notes.free_form == "kept"  # unknown keys are fine


def test_an_exception_saves_last_checkpoint(files):
    """In process (the exception propagates out of main): last.ckpt holds the state after step 2."""
    logs, threads = files["tmp"] / "raise_logs", torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(RuntimeError, match="test failure at step 2"):
            main.main(base_args(files, **{"-l": str(logs)}) + [
                "lightning.trainer.max_steps=4", "lightning.callbacks.image_logger=null",
                "lightning.callbacks.boom.target=tests.main_helpers.RaiseAtStep",
                "lightning.callbacks.boom.params.step=2"])
    finally:
        torch.set_num_threads(threads)
    (run_dir,) = run_dirs(logs)
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["last.ckpt"]
    assert load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 2


# ---- bad inputs: one line on stderr, exit status 2 --------------------------------------------------
def one_line_error(capsys, argv: list[str]) -> str:
    code = main.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    return err[0]


def test_bad_resume_path_from_the_command_line(run):
    code, err = run["bad"]
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--resume" in err and "nowhere" in err


def base_args(files, **changes) -> list[str]:
    args = {"--base": str(DREAMBOOTH_TINY), "--actual_resume": str(files["base"]),
            "--data_root": str(files["instance"]), "-l": str(files["tmp"] / "bad_logs"), **changes}
    return ["-t"] + [x for k, v in args.items() if v is not None for x in (k, v)]


def test_missing_data_root(capsys, files):
    assert "--data_root is required" in one_line_error(capsys, base_args(files, **{"--data_root": None}))
    msg = one_line_error(capsys, base_args(files, **{"--data_root": str(files["tmp"] / "absent")}))
    assert "absent" in msg and "no such folder" in msg


def test_empty_data_root(capsys, files):
    (files["tmp"] / "empty").mkdir(exist_ok=True)
    msg = one_line_error(capsys, base_args(files, **{"--data_root": str(files["tmp"] / "empty")}))
    assert "empty" in msg and "no images" in msg


def test_missing_base_checkpoint(capsys, files):
    assert "--actual_resume is required" in one_line_error(capsys, base_args(files, **{"--actual_resume": None}))
    msg = one_line_error(capsys, base_args(files, **{"--actual_resume": str(files["tmp"] / "absent.ckpt")}))
    assert "absent.ckpt" in msg and "not found" in msg


def test_base_checkpoint_that_is_not_sd_v1(capsys, files):
    wrong = files["tmp"] / "wrong.ckpt"
    torch.save({"state_dict": {"some.other.weight": torch.zeros(2)}}, wrong)
    msg = one_line_error(capsys, base_args(files, **{"--actual_resume": str(wrong)}))
    assert "wrong.ckpt" in msg and re.search(r"missing keys \d+ \(betas", msg) and re.search(r"unexpected keys \d+ \(some.other.weight", msg)


def test_class_word_missing_for_class_images(capsys, files):
    msg = one_line_error(capsys, base_args(files, **{"--reg_data_root": str(files["tmp"] / "reg_x")}))
    assert "--class_word" in msg and "reg_x" in msg


def test_bad_resume_path(capsys, files):
    assert "--resume" in one_line_error(capsys, ["-r", str(files["tmp"] / "nowhere"), "-t"])
    assert "checkpoints/last.ckpt" in one_line_error(capsys, ["-r", str(files["tmp"]), "-t"])


def test_config_without_model(capsys, files):
    no_model = files["tmp"] / "no_model.yaml"
    no_model.write_text("data: {target: x}\n")
    assert "no 'model' section" in one_line_error(capsys, base_args(files, **{"--base": str(no_model)}))


def test_unknown_trainer_argument(capsys, files):
    msg = one_line_error(capsys, base_args(files) + ["lightning.trainer.max_stepz=3"])
    assert "lightning.trainer.max_stepz" in msg


def test_overrides_may_follow_the_base_configs(capsys):
    opt, overrides = main.parse_args(["--base", str(DREAMBOOTH_TINY), "a.b=1", "-t", "c.d=[1, 2]"])
    assert opt.base == [str(DREAMBOOTH_TINY)] and opt.train and overrides == ["a.b=1", "c.d=[1, 2]"]
    assert "unrecognized argument 'stray'" in one_line_error(capsys, ["--base", str(DREAMBOOTH_TINY), "-t", "stray"])
    assert "cannot be combined" in one_line_error(capsys, ["-r", "x", "-n", "y"])


def test_runs_started_in_the_same_instant_get_their_own_folders(tmp_path):
    """Each folder is one mkdir of its own (the exists-then-mkdir race gave two runs one folder)."""
    import threading
    from core.trainer import new_run_folder
    start, made = threading.Barrier(8), []

    def make():
        start.wait()
        made.append(new_run_folder(tmp_path / "logs", "2026-12-01T10-00-00_dog"))

    threads = [threading.Thread(target=make) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    names = sorted(p.name for p in made)
    assert names == sorted(["2026-12-01T10-00-00_dog"] + [f"2026-12-01T10-00-00_dog_{i}" for i in range(1, 8)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_weight_check_finds_one_non_finite_element_in_any_tensor_and_dtype(dtype):
    """One norm over all trainable tensors: NaN, +inf or -inf in one element of one of them is found; the
    largest finite values (their sum of squares overflows) are not mistaken for inf."""
    from core.callbacks.finite import _all_finite
    big = torch.finfo(dtype).max
    weights = [torch.full((3, 4), big, dtype=dtype), -torch.full((5,), big, dtype=dtype), torch.zeros(2, 2, dtype=dtype),
               torch.randn(7, dtype=torch.float32)]
    assert _all_finite(weights) and _all_finite([])
    for bad in (float("nan"), float("inf"), -float("inf")):
        for i in range(len(weights)):
            spoilt = [w.clone() for w in weights]
            spoilt[i].view(-1)[-1] = bad
            assert not _all_finite(spoilt), (bad, i)


@pytest.mark.parametrize("what", ["loss", "grad"])
def test_a_non_finite_loss_or_step_stops_the_run_and_never_reaches_a_checkpoint(files, capsys, what):
    """Step 3 made non-finite; checkpoints every step. A NaN loss stops before its backward pass (last.ckpt:
    the exact state after step 2); a NaN gradient stops after the step, which is never saved."""
    logs, threads = files["tmp"] / f"nan_{what}", torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main.main(base_args(files, **{"-l": str(logs)}) + [
            "lightning.trainer.max_steps=5", "lightning.callbacks.image_logger=null",
            "lightning.checkpoint.every_n_steps=1", "lightning.checkpoint.keep_last=10",
            "lightning.callbacks.nan.target=tests.main_helpers.NonFiniteAtStep",
            "lightning.callbacks.nan.params.step=3", f"lightning.callbacks.nan.params.what={what}"])
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert code == 2
    expected = ("step 3: the training loss is nan; stopped before its backward pass" if what == "loss" else
                "step 3: the optimizer step made weights NaN or inf (1 tensors")
    assert f"main.py: error: {expected}" in err, err
    (run_dir,) = run_dirs(logs)
    for path in (run_dir / "checkpoints").glob("*.ckpt"):
        ckpt = load_checkpoint(path)
        assert ckpt["global_step"] <= 2, path
        assert all(v.isfinite().all() for v in ckpt["state_dict"].values() if v.is_floating_point()), path
    assert load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 2


def test_a_run_that_fails_before_any_checkpoint_leaves_nothing_behind(run, files, capsys):
    """An image that cannot be decoded fails when the data are set up: a new run's folder is removed,
    and a failed resume does not add another configs/*.yaml to the run."""
    bad = files["tmp"] / "bad_images"
    bad.mkdir()
    (bad / "a.png").write_bytes(make_images(files["tmp"] / "one", 1).joinpath("00.png").read_bytes()[:60])
    logs = files["tmp"] / "failed_logs"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main.main(base_args(files, **{"-l": str(logs), "--data_root": str(bad)})) == 2
        assert "a.png" in capsys.readouterr().err
        assert not logs.exists() or not list(logs.iterdir())
        configs = sorted((run["dir"] / "configs").glob("*.yaml"))
        assert main.main(["-r", str(run["dir"]), "-t", f"data.params.train.params.data_root={bad}",
                          f"lightning.trainer.max_steps={STEPS + 1}"]) == 2
        assert "a.png" in capsys.readouterr().err
        assert sorted((run["dir"] / "configs").glob("*.yaml")) == configs
    finally:
        torch.set_num_threads(threads)
