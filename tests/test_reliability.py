"""The reliability script (benchmarks/reliability.py): a short run of its cheapest check passes, its
comparisons catch a one-ulp loss, a flipped bit, a changed file, and any failing check makes it exit 1;
and the pieces it relies on: stale temporaries of dead writers are removed (never a live process's),
a failed write is one line naming the file, and a stop signal during class-image generation is one line."""
from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import reliability
from core.cli import Stopped, run_cli
from core.weights import WriteError, atomic_path, remove_stale_temporaries, save_checkpoint, temporary_prefix
from tests.main_helpers import _env
from tests.sd_fixtures import ROOT


def test_a_short_run_of_the_cheapest_check_passes(tmp_path):
    """One evaluation killed at random and rerun (the cheapest check with a subprocess kill)."""
    res = subprocess.run([sys.executable, "-m", "benchmarks.reliability", "--trials", "1", "--only", "eval",
                          "--out", str(tmp_path / "table.md")], cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "| `evaluate_blip2.py` SIGKILLed, rerun | 1 | 1/1 ok |" in (tmp_path / "table.md").read_text()


def test_processes_racing_for_a_run_folder_never_share_one(tmp_path):
    import multiprocessing

    mp = multiprocessing.get_context("fork")
    for race in range(3):
        barrier, queue = mp.Barrier(4), mp.Queue()
        procs = [mp.Process(target=reliability._race, args=(str(tmp_path / str(race)), barrier, queue))
                 for _ in range(4)]
        for proc in procs:
            proc.start()
        folders = {queue.get(timeout=60) for _ in procs}
        for proc in procs:
            proc.join()
        assert len(folders) == 4 and sorted(p.name for p in (tmp_path / str(race)).iterdir()) == [
            "2026-01-01T00-00-00_same", "2026-01-01T00-00-00_same_1", "2026-01-01T00-00-00_same_2",
            "2026-01-01T00-00-00_same_3"]


def test_the_comparisons_catch_one_ulp_one_bit_and_one_byte(tmp_path):
    scalars = {"train/loss": {1: 0.5, 2: 0.25}, "lr": {1: 1e-4, 2: 2e-4}}
    copy = {tag: dict(v) for tag, v in scalars.items()}
    assert reliability.scalar_differences(scalars, copy) == []
    reliability.tamper_scalars(copy)
    [difference] = reliability.scalar_differences(scalars, copy)
    assert difference.startswith("lr: step 1 0.0001 != 0.0001000000")
    del copy["lr"][2]
    assert "lr: steps [1, 2] vs [1]" in reliability.scalar_differences(scalars, copy)

    state = {"global_step": 3, "state_dict": {"w": torch.ones(3)}, "optimizer_states": [{"state": {0: {"m": torch.zeros(2)}}}],
             "lr_schedulers": [{"last_epoch": 3}]}
    other = {**state, "state_dict": {"w": torch.ones(3).nextafter(torch.tensor(2.0))}}
    assert reliability.state_differences(state, state) == []
    assert reliability.state_differences(state, other) == ["state_dict.w: tensors differ"]
    assert reliability.state_differences(state, {**state, "global_step": 4}) == ["global_step: 3 != 4"]
    assert reliability.state_differences(state, {**state, "state_dict": {"w": torch.ones(3, dtype=torch.float64)}})

    files = {"class_00000.png": b"abc", "class_00001.png": b"def"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    assert reliability.file_differences(files, tmp_path) == []
    tampered = dict(files)
    reliability.tamper_bytes(tampered)
    assert reliability.file_differences(tampered, tmp_path) == ["class_00000.png differs"]
    (tmp_path / ".class_00001.png.host-1.x.tmp").write_bytes(b"")
    (tmp_path / "class_00001.png").unlink()
    assert reliability.file_differences(files, tmp_path) == ["missing class_00001.png",
                                                              "unexpected .class_00001.png.host-1.x.tmp"]


def test_any_failing_check_makes_the_script_exit_1(monkeypatch, tmp_path, capsys):
    def passing(ctx):
        row = reliability.Row("passes")
        row.trial([], "t0")
        return row

    def failing(ctx):
        row = passing(ctx)
        row.trial(["loss differs"], "t1")
        return row

    monkeypatch.setattr(reliability, "CHECKS", {"a": passing, "b": failing})
    assert reliability.main(["--only", "a"]) == 0
    assert reliability.main(["--only", "a,b", "--out", str(tmp_path / "t.md")]) == 1
    assert "| passes | 2 | 1/2 FAIL |" in (tmp_path / "t.md").read_text()
    assert "t1: loss differs" in capsys.readouterr().out


# ---- the machinery it checks --------------------------------------------------------------------------
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_dead_writers_go_and_live_ones_stay(tmp_path):
    target = tmp_path / "step-000003.ckpt"
    mine = tmp_path / f"{temporary_prefix(target)}abc.tmp"
    host = temporary_prefix(target).split(".")[-2].rsplit("-", 1)[0]
    dead = tmp_path / f".step-000003.ckpt.{host}-{_dead_pid()}.abc.tmp"
    other_name = tmp_path / f".step-000004.ckpt.{host}-{_dead_pid()}.abc.tmp"
    live = tmp_path / f".step-000003.ckpt.{host}-{os.getppid()}.abc.tmp"  # a live process (the parent)
    other_host = tmp_path / f".step-000003.ckpt.elsewhere-{_dead_pid()}.abc.tmp"
    unrelated = tmp_path / ".step-000003.ckpt.abc.tmp"  # not a name this project writes
    for path in (mine, dead, other_name, live, other_host, unrelated):
        path.write_bytes(b"partial")
    assert remove_stale_temporaries(tmp_path, "step-000003.ckpt") == [dead]
    assert remove_stale_temporaries(tmp_path) == [other_name]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (mine, live, other_host, unrelated))
    (tmp_path / other_name.name).write_bytes(b"partial")
    with atomic_path(tmp_path / "step-000004.ckpt") as tmp:  # a write of a name clears that name's dead ones
        tmp.write_bytes(b"whole")
    assert not other_name.exists() and (tmp_path / "step-000004.ckpt").read_bytes() == b"whole"


def test_a_write_past_the_file_size_limit_is_one_line_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "last.ckpt"
    save_checkpoint({"w": torch.zeros(4)}, path)
    before = path.read_bytes()
    code = ("import resource, torch; from core.weights import save_checkpoint; "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16)); "
            f"save_checkpoint({{'w': torch.zeros(1 << 16)}}, {str(path)!r})")
    res = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "core.weights.WriteError" in res.stderr
    assert f"{path}: not written: File too large (EFBIG); any previous version of the file is kept" in res.stderr
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_run_cli_reports_a_failed_write_and_a_stop_in_one_line_with_status_1(capsys):
    def fails(error):
        def run(argv):
            raise error
        return run

    full = WriteError("out/x.ckpt: not written: No space left on device (ENOSPC)")
    full.errno = errno.ENOSPC
    assert run_cli("prog", fails(full), []) == 1
    assert capsys.readouterr().err == "prog: error: out/x.ckpt: not written: No space left on device (ENOSPC)\n"
    assert run_cli("prog", fails(Stopped("SIGTERM: stopped while generating class images: 3 of 6")), []) == 1
    assert capsys.readouterr().err == "prog: stopped: SIGTERM: stopped while generating class images: 3 of 6\n"
    with pytest.raises(OSError):
        run_cli("prog", fails(OSError(errno.EIO, "not a write of ours")), [])


def test_a_run_whose_model_takes_no_base_checkpoint_resumes(tmp_path):
    """Found by the script's BLIP-2 check: ``-r`` set ``model.params.ckpt_path`` on every model, and
    BLIP-2's fine-tuning system (no such parameter) could not be resumed."""
    from core.trainer import parse_args, run_config

    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "a-project.yaml").write_text(
        "model:\n  target: blip2.models.finetune.Blip2OPTFinetune\n  params:\n    pretrained: tiny\n")
    opt, overrides = parse_args(["-r", str(tmp_path), "-t"])
    assert "ckpt_path" not in run_config(opt, overrides, tmp_path).model.params
    opt, overrides = parse_args(["-r", str(tmp_path), "-t", "--actual_resume", "base.ckpt"])
    assert "ckpt_path" not in run_config(opt, overrides, tmp_path).model.params  # relocate_base's business
