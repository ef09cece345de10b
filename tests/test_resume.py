"""Exact resume: a run stopped by SIGTERM, resumed, killed by SIGKILL, resumed again, equals the
uninterrupted run (per-step losses, learning rates, final weights with EMA, optimizer state);
and the resumable sampler's order and state."""
from __future__ import annotations

import signal

import pytest
import torch

from core.weights import load_checkpoint
from core.data.sampler import ResumableSampler
from tests.main_helpers import (DREAMBOOTH_TINY, base_checkpoint, make_images, read_scalars, run_dirs, run_main,
                                start_main)

STEPS = 6  # 3 instance images x 1 repeat: 2 epochs; checkpoints every 3 steps (ends of epochs)
SETTINGS = [f"lightning.trainer.max_steps={STEPS}", "lightning.checkpoint.every_n_steps=3",
            "lightning.checkpoint.keep_last=5", "model.params.use_ema=true",
            "data.params.train.params.crop=random", "data.params.train.params.repeats=1",
            "model.params.scheduler_config.target=ldm.lr_scheduler.LambdaLinearScheduler",
            "model.params.scheduler_config.params.warm_up_steps=[4]",
            "model.params.scheduler_config.params.f_start=[0.1]", "model.params.scheduler_config.params.f_max=[1.0]",
            "model.params.scheduler_config.params.f_min=[0.5]",
            "model.params.scheduler_config.params.cycle_lengths=[100]"]
TAGS = ("train/loss", "train/loss_instance", "train/loss_class", "lr-AdamW/unet")


def kill_at(step: int, signum: str, times: int = 1) -> list[str]:
    return ["lightning.callbacks.kill.target=tests.main_helpers.KillAtStep",
            f"lightning.callbacks.kill.params.step={step}", f"lightning.callbacks.kill.params.signum={signum}",
            f"lightning.callbacks.kill.params.times={times}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A: uninterrupted. B: SIGTERM after step 1 (mid-epoch; last.ckpt at 1); resumed, Ctrl-C after step 2
    (last.ckpt at 2); resumed, SIGKILLed after step 4 (last periodic checkpoint: step 3, an epoch's end);
    resumed, Ctrl-C twice right after the optimizer step of step 5 (a half-way state: nothing saved,
    last.ckpt stays at 3); resumed to the end."""
    tmp = tmp_path_factory.mktemp("resume")
    inst, base = make_images(tmp / "instance", 3), base_checkpoint(tmp / "base.ckpt")

    def args(name: str) -> list[str]:
        return ["--base", str(DREAMBOOTH_TINY), "-t", "--actual_resume", str(base), "--data_root", str(inst),
                "--reg_data_root", str(tmp / f"reg_{name}"), "--class_word", "dog", "-l", str(tmp / name),
                *SETTINGS]

    a, b1 = start_main(args("A"), tmp), start_main(args("B") + kill_at(1, "SIGTERM"), tmp)
    out = {"A": a.communicate(timeout=300), "B1": b1.communicate(timeout=300)}
    out["codes"] = [a.returncode, b1.returncode]
    run_a, run_b = run_dirs(tmp / "A")[0], run_dirs(tmp / "B")[0]
    last = lambda: load_checkpoint(run_b / "checkpoints" / "last.ckpt")["global_step"]  # noqa: E731
    out["last"] = [last()]
    logs = [out["A"][1], out["B1"][1]]
    for kill in (kill_at(2, "SIGINT"), kill_at(4, "SIGKILL"), kill_at(5, "SIGINT", times=2),
                 ["lightning.callbacks.kill=null"]):
        done = run_main(["-r", str(run_b), "-t", *kill], tmp)
        out["codes"].append(done.returncode)
        out["last"].append(last())
        logs.append(done.stderr)
    out["logs"], out["stderr"] = [log[-3000:] for log in logs], logs
    out["A_dir"], out["B_dir"] = run_a, run_b
    return out


def test_runs_stop_and_resume_as_asked(runs):
    assert runs["codes"] == [0, 0, 0, -signal.SIGKILL, 1, 0], runs["logs"]
    # SIGTERM, Ctrl-C: saved at the step boundary after the signal, clean exit; SIGKILL: the periodic
    # checkpoint before it; Ctrl-C twice inside the step: not saved, the last checkpoint stays
    assert runs["last"] == [1, 2, 3, 3, 6]
    assert "Stop signal received: saving" in runs["stderr"][1] and "at step 1" in runs["stderr"][1]
    assert "Stop signal received: saving" in runs["stderr"][2] and "at step 2" in runs["stderr"][2]
    assert "KeyboardInterrupt during the optimizer step" in runs["stderr"][4]
    assert "the state is half-way, not saved" in runs["stderr"][4] and "last.ckpt is step 3" in runs["stderr"][4]


def test_losses_and_learning_rates_equal_the_uninterrupted_run(runs):
    for tag in TAGS:
        a, b = read_scalars(runs["A_dir"], tag), read_scalars(runs["B_dir"], tag)
        assert len(a) == STEPS, (tag, a)
        assert a == b, tag  # exactly, step by step
    lrs = read_scalars(runs["A_dir"], "lr-AdamW/unet")
    assert len(set(lrs.values())) == STEPS  # the warm-up schedule changes the lr every step


def test_final_state_equals_the_uninterrupted_run(runs):
    a = load_checkpoint(runs["A_dir"] / "checkpoints" / "last.ckpt")
    b = load_checkpoint(runs["B_dir"] / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == STEPS
    assert any(k.startswith("model_ema.") for k in a["state_dict"])
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["lr_schedulers"] == b["lr_schedulers"]


# ---- the sampler alone -----------------------------------------------------------------------------
def test_sampler_order_is_a_function_of_seed_and_epoch():
    s = ResumableSampler(10, seed=3)
    first = list(s)
    assert sorted(first) == list(range(10)) and first == list(ResumableSampler(10, seed=3))
    s.set_epoch(1)
    assert list(s) != first and sorted(list(s)) == list(range(10))
    assert list(ResumableSampler(10, seed=4)) != first
    assert list(ResumableSampler(10, shuffle=False)) == list(range(10))


def test_sampler_shards_cover_the_epoch_once():
    shards = [list(ResumableSampler(7, seed=1, num_replicas=3, rank=r)) for r in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3] == [len(ResumableSampler(7, num_replicas=3, rank=r)) for r in range(3)]
    flat = sorted(sum(shards, []))
    assert set(flat) == set(range(7)) and len(flat) == 9  # padded by wrapping, as DistributedSampler


def test_sampler_resumes_mid_epoch_and_rolls_over_at_the_end():
    full = [list(ResumableSampler(8, seed=5, num_replicas=2, rank=r)) for r in range(2)]
    for r in range(2):
        state = ResumableSampler(8, seed=5, num_replicas=2, rank=r).state_dict(consumed=6)  # 3 per rank
        resumed = ResumableSampler(8, seed=5, num_replicas=2, rank=r)
        resumed.load_state_dict(state)
        assert list(resumed) == full[r][3:]
        assert list(resumed) == full[r]  # the next iterator starts the epoch afresh
    done = ResumableSampler(8, seed=5)
    done.load_state_dict({**done.state_dict(consumed=8), "epoch": 2})
    assert done.epoch == 3 and done.consumed == 0
    with pytest.raises(ValueError, match="seed"):
        ResumableSampler(8, seed=6).load_state_dict(done.state_dict(consumed=0))


def test_dataloader_iterators_leave_the_global_rng_alone():
    from core.data.datamodule import DataModuleFromConfig

    dm = DataModuleFromConfig(batch_size=2, train={"target": "ldm.data.personalized.PersonalizedBase"})
    loader = dm._loader(list(range(6)), ResumableSampler(6))
    before = torch.get_rng_state()
    assert sorted(sum((b.tolist() for b in loader), [])) == list(range(6))
    assert torch.equal(before, torch.get_rng_state())
