"""Helpers for the ``main.py`` tests: tiny data and checkpoints, subprocess runs, TensorBoard
scalars, and callbacks injected through ``lightning.callbacks.<name>.target=...`` overrides."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image

from ldm.callbacks.class_images import ClassImageSampler
from tests.sd_fixtures import ROOT, tiny_model

DREAMBOOTH_TINY = ROOT / "configs" / "toy" / "dreambooth-tiny.yaml"


def make_images(folder: Path, n: int, size: int = 40, seed: int = 0) -> Path:
    """``n`` random RGB PNGs (non-square, so cropping is exercised)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    return folder


def base_checkpoint(path: Path, seed: int = 0) -> Path:
    """A tiny sd-v1 style checkpoint ({'state_dict': ...}) of the tiny LatentDiffusion."""
    torch.save({"state_dict": tiny_model(seed).state_dict()}, path)
    return path


def _env() -> dict[str, str]:
    """One thread per process: identical float reductions in every run, and no oversubscription."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1"}


def start_main(args: list[str], cwd: Path) -> subprocess.Popen:
    """``python main.py *args`` in the background (stdout and stderr piped)."""
    return subprocess.Popen([sys.executable, str(ROOT / "main.py"), *args], cwd=cwd, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_main(args: list[str], cwd: Path, timeout: float = 300, warnings: bool = False) -> subprocess.CompletedProcess:
    """``warnings``: Python's default warning filters, as a user's console has them."""
    env = _env()
    if warnings:
        del env["PYTHONWARNINGS"]
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_dirs(logdir: Path) -> list[Path]:
    return sorted(p for p in logdir.iterdir() if p.is_dir())


def read_scalars(run: Path, tag: str) -> dict[int, float]:
    """step -> value of ``tag`` over the run's TensorBoard event files, later files winning
    (a resumed run rewrites the steps after its checkpoint)."""
    return read_all_scalars(run).get(tag, {})


def read_all_scalars(run: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} of every scalar in the run's TensorBoard event files (as ``read_scalars``)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[str, dict[int, float]] = {}
    for events in sorted((run / "tensorboard").glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            values.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return values


class KillAtStep(pl.Callback):
    """Sends ``signum`` (default SIGKILL) ``times`` times to its own process at the end of optimizer step
    ``step`` (before the checkpoint callback's hook and the LightningModule's EMA update)."""

    def __init__(self, step: int, signum: str = "SIGKILL", times: int = 1):
        self.step, self.signum, self.times = step, getattr(signal, signum), times

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)


class SignalInHook(pl.Callback):
    """Sends ``signum`` to its own process in the callback hook ``hook`` (``setup``: before the class
    images and the first step; ``teardown``: after the final checkpoint)."""

    def __init__(self, hook: str, signum: str = "SIGTERM"):
        self.hook, self.signum = hook, getattr(signal, signum)

    def setup(self, trainer, pl_module, stage) -> None:
        if self.hook == "setup":
            os.kill(os.getpid(), self.signum)

    def teardown(self, trainer, pl_module, stage) -> None:
        if self.hook == "teardown":
            os.kill(os.getpid(), self.signum)


class RaiseAtStep(pl.Callback):
    """Raises RuntimeError as the batch after optimizer step ``step`` starts."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"test failure at step {self.step}")


class RankRecorder(pl.Callback):
    """Writes ``<folder>/rank<r>.pt``: the rank's final weights and a digest of each of its batches."""

    def __init__(self, folder: str):
        self.folder, self.batches = Path(folder), []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches.append(batch["instance"]["image"].double().sum().item())

    def on_train_end(self, trainer, pl_module) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": pl_module.state_dict(), "batches": self.batches},
                   self.folder / f"rank{trainer.global_rank}.pt")


class RecordingClassImageSampler(ClassImageSampler):
    """The class-image sampler, also writing the indices each rank generated to ``<record_dir>/rank<r>.json``."""

    def __init__(self, record_dir: str, **kwargs):
        super().__init__(**kwargs)
        self.record_dir, self.rank = Path(record_dir), 0

    def on_fit_start(self, trainer, pl_module) -> None:
        self.rank = trainer.global_rank
        super().on_fit_start(trainer, pl_module)

    def generate(self, model, indices, progress=False, class_set=None):
        self.record_dir.mkdir(parents=True, exist_ok=True)
        (self.record_dir / f"rank{self.rank}.json").write_text(json.dumps(list(indices)))
        return super().generate(model, indices, progress, class_set)


class NonFiniteAtStep(pl.Callback):
    """Makes optimizer step ``step`` non-finite: its loss (``what="loss"``, just before the backward pass)
    or one trainable gradient (``what="grad"``, just before the optimizer step)."""

    def __init__(self, step: int, what: str = "loss"):
        self.step, self.what = step, what

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if self.what == "loss" and trainer.global_step + 1 == self.step:
            loss.data.fill_(float("nan"))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.what == "grad" and trainer.global_step + 1 == self.step:
            p = next(p for p in pl_module.parameters() if p.requires_grad and p.grad is not None)
            p.grad.view(-1)[0] = float("nan")
