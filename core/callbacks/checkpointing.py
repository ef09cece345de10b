"""Resumable checkpoints from which a run resumes exactly, and the pieces they need.

A checkpoint holds the weights (EMA included: ``model_ema.*``; without the frozen ones a system
leaves out and refers to its base file for, ``core.lean``), optimizer, LR scheduler, step and
loop counters (Lightning's), the data order (``DataModuleFromConfig.state_dict``) and the RNG
states of torch, CUDA, numpy and python for every rank (here). On CPU a resumed run reproduces
the uninterrupted run's losses and weights bit for bit. How:

1. The state is taken between two training steps: loop counters as they stand at the end of step
   ``k`` (``on_train_batch_end``, the point Lightning's own restart logic expects), everything else
   at the start of step ``k + 1`` (``on_train_batch_start``), after the LightningModule's
   ``on_train_batch_end`` updated the EMA and after any validation; the final and the
   signal-triggered checkpoints are written in ``on_train_end``.
2. A resumed run restores the RNG states at the same point, its first ``on_train_batch_start``.
3. Files are written atomically (``AtomicCheckpointIO``); ``last.ckpt`` is a hard link to the newest
   step file (a copy where links are not possible), replaced in one rename.
4. SIGTERM, SIGUSR1 and SIGINT (Ctrl-C) set a flag (``core.signals``); at the next optimizer-step
   boundary every rank agrees to stop, the state is saved and training ends cleanly. A second
   Ctrl-C interrupts at once (``KeyboardInterrupt``), as an exception does.
5. An exception saves ``last.ckpt`` only when the state is that of a step boundary: when it struck
   in data loading, the forward or the backward pass (the weights, optimizer and EMA are still those
   of the last finished step), or between two batches. From the optimizer step of a batch until the
   last of its end hooks has run (the optimizer's per-parameter updates, the EMA update), and during
   validation, the state is half-way, and nothing is written: the last checkpoint stays the newest,
   and one line says which it is.
6. A checkpoint that cannot be written (a full disk, a file size limit) stops the run with one line
   (``core.weights.WriteError``: the file, the reason, and which step ``last.ckpt`` still is); the
   previous checkpoints are untouched and nothing is retried. The temporaries that killed writers
   left in the checkpoint folder are removed at train start (``core.weights.remove_stale_temporaries``:
   never those of a live process, e.g. another rank).
"""
from __future__ import annotations

import copy
import os
import random
import shutil
import signal
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities import rank_zero_info

from core.signals import StopSignals
from core.weights import (WriteError, load_checkpoint, remove_stale_temporaries, save_checkpoint,
                          temporary_prefix, write_error)

STEP_FILE = "step-{:06d}.ckpt"
LAST_FILE = "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO through ``core.weights``: atomic writes, ``weights_only`` reads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        save_checkpoint(checkpoint, path)

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint(path)


# ---- RNG states, as tensors and plain types (readable with weights_only=True) ------------------
def rng_state() -> dict[str, Any]:
    """The global RNG states of this process: torch (CPU and CUDA), numpy and python."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, mt, py_gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": py_gauss}}


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss"]))


def gather_objects(trainer: pl.Trainer, obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (a collective: every rank must call it)."""
    if trainer.world_size == 1 or not torch.distributed.is_initialized():
        return [obj]
    out: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def loop_state(trainer: pl.Trainer) -> dict[str, Any]:
    """A copy of the ``loops`` entry Lightning writes into a checkpoint."""
    loops = {"fit_loop": trainer.fit_loop, "validate_loop": trainer.validate_loop,
             "test_loop": trainer.test_loop, "predict_loop": trainer.predict_loop}
    return copy.deepcopy({name: loop.state_dict() for name, loop in loops.items()})


def publish(src: Path, dst: Path) -> None:
    """Make ``dst`` the same file as ``src`` (a hard link, else a copy) in one atomic rename."""
    tmp = dst.with_name(f"{temporary_prefix(dst)}link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise write_error(dst, err) from None


def _batches(trainer: pl.Trainer) -> Any:
    """Lightning's counts of the run's training batches (``ready``: fetched, ``completed``: every end hook run)."""
    return trainer.fit_loop.epoch_loop.batch_progress.total


class RankSeed(pl.Callback):
    """Seeds every rank's global RNGs with ``seed + rank`` at setup: the ranks draw different
    noise and timesteps, and each rank's draws are reproducible."""

    def __init__(self, seed: int):
        self.seed = seed

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl.seed_everything(self.seed + trainer.global_rank, verbose=False)


class ResumableCheckpoint(Checkpoint):
    """Writes ``dirpath/step-NNNNNN.ckpt`` every ``every_n_steps`` optimizer steps and at the end,
    keeps the newest ``keep_last`` of them, and points ``last.ckpt`` at the newest (see the module
    notes for what is saved and when)."""

    def __init__(self, dirpath: str | os.PathLike, every_n_steps: int = 500, keep_last: int = 3):
        if every_n_steps < 1 or keep_last < 1:
            raise ValueError(f"lightning.checkpoint: every_n_steps={every_n_steps}, keep_last={keep_last}: "
                             "expected positive integers")
        self.dirpath = Path(dirpath)
        self.every_n_steps, self.keep_last = every_n_steps, keep_last
        self._loops: dict[str, Any] | None = None  # loop counters at the end of the last finished step
        self._rng_at_boundary: dict[str, Any] | None = None  # as the first batch after that step started
        self._at_boundary = True  # no batch has started since the last finished step (or the run's start)
        self._stepping_batch = -1  # the batch (Lightning's count of fetched batches) of the last optimizer step
        self._validating = False
        self._rng_ranks: list[dict[str, Any]] = []  # what the checkpoint being written stores
        self._rng_to_restore: list[dict[str, Any]] | None = None
        self._save_due = self._writing = False
        self._last_step, self._saved_step = -1, -1
        self._stops = StopSignals()  # Ctrl-C twice raises at once: saved only at a consistent point (on_exception)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Install the stop handlers (after Lightning installed its own, which they replace)."""
        self._last_step = trainer.global_step
        self._stepping_batch, self._at_boundary, self._validating = -1, True, False
        if trainer.ckpt_path and self._saved_step < 0:  # resumed: that checkpoint is the newest saved state
            self._saved_step = trainer.global_step
        stale = remove_stale_temporaries(self.dirpath)
        if stale:
            rank_zero_info(f"{self.dirpath}: removed {len(stale)} temporary file(s) left by a killed writer")
        self._stops.install()
        connector = getattr(trainer, "_signal_connector", None)
        if connector is not None and connector.received_sigterm:  # Lightning's handler, before ours was there
            self._stops.received, connector.received_sigterm = signal.SIGTERM, False  # stop at our boundary

    def _stop_requested(self, trainer: pl.Trainer) -> bool:
        """True on every rank when any rank got a stop signal (a collective, once per batch)."""
        return trainer.strategy.reduce_boolean_decision(self._stops.received is not None, all=False)

    # ---- when to save -------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._rng_to_restore is not None:
            self._restore_rng(trainer)
        if self._save_due:
            self._save(trainer)
        if self._at_boundary:  # the first batch after a step (or of the run): the state is that step's
            self._rng_at_boundary, self._at_boundary = rng_state(), False

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self._stepping_batch = _batches(trainer).ready

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validating = True

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validating = False

    def _consistent(self, trainer: pl.Trainer) -> bool:
        """Whether the state is a step boundary's: the batch of the last optimizer step has completed
        (its EMA update included; Lightning counts a batch completed after every hook of its end),
        and no validation is half-way."""
        return _batches(trainer).completed >= self._stepping_batch and not self._validating

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        stepped = trainer.global_step != self._last_step  # False while accumulating gradients
        self._last_step = trainer.global_step
        if not stepped:
            return
        self._loops, self._at_boundary = loop_state(trainer), True
        if self._stop_requested(trainer):
            rank_zero_info(f"Stop signal received: saving {self.dirpath / LAST_FILE} at step {trainer.global_step} "
                           "and stopping.")
            trainer.should_stop = True
        self._save_due = trainer.global_step % self.every_n_steps == 0

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._loops is not None:
            self._save(trainer)
        self._stops.restore()  # the handlers found at train start, before Lightning's teardown restores its own

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Save ``last.ckpt`` from this process alone (other ranks may be stuck in a collective), when the
        state is that of a step boundary (module notes, 5)."""
        self._stops.restore()
        if self._loops is None or isinstance(exception, WriteError):
            return  # no training step finished in this run, or a save failed (its message says what is kept)
        if not self._consistent(trainer):
            rank_zero_info(f"{type(exception).__name__} during the optimizer step or the updates after it "
                           f"(step {trainer.global_step}): the state is half-way, not saved; {self._kept()}")
            return
        # the RNG as the first batch after the step started (or as it stands, when none has yet)
        rng = rng_state() if self._at_boundary or self._rng_at_boundary is None else self._rng_at_boundary
        self._rng_ranks = [rng] if trainer.world_size == 1 else []
        if trainer.is_global_zero:
            self._writing = True
            try:
                checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
                trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, self.dirpath / LAST_FILE)
            except WriteError as err:  # the exception being handled stays the one reported
                rank_zero_info(f"{type(exception).__name__} during training, and {err}")
                return
            finally:
                self._writing = False
            rank_zero_info(f"{type(exception).__name__} during training: saved {self.dirpath / LAST_FILE} "
                           f"at step {trainer.global_step}")

    def _kept(self) -> str:
        """Which checkpoint is the newest saved state (for the lines of a run that stops unsaved)."""
        if self._saved_step >= 0:
            return f"{self.dirpath / LAST_FILE} is step {self._saved_step}"
        return f"the newest checkpoint in {self.dirpath} (if any) is from before this run"

    # ---- writing ------------------------------------------------------------------------------
    def _save(self, trainer: pl.Trainer) -> None:
        """Write the step file and ``last.ckpt`` (all ranks call this: the RNG states are gathered)."""
        self._save_due = False
        if trainer.global_step == self._saved_step:
            return
        self._rng_ranks = gather_objects(trainer, rng_state())
        path = self.dirpath / STEP_FILE.format(trainer.global_step)
        self._writing = True
        try:
            trainer.save_checkpoint(path, weights_only=False)
        except WriteError as err:
            raise WriteError(f"{err}; the run stops: {self._kept()}") from None
        finally:
            self._writing = False
        self._saved_step = trainer.global_step
        if trainer.is_global_zero:
            publish(path, self.dirpath / LAST_FILE)
            self._prune(trainer)

    def _prune(self, trainer: pl.Trainer) -> None:
        steps = sorted(self.dirpath.glob("step-*.ckpt"), key=lambda p: int(p.stem.split("-")[1]))
        for old in steps[:-self.keep_last]:
            trainer.strategy.remove_checkpoint(old)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Our writes store the loop counters of the end of the last finished batch."""
        if self._writing:
            checkpoint["loops"] = self._loops

    # ---- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"rng": self._rng_ranks} if self._writing else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rng_to_restore = state_dict.get("rng")

    def _restore_rng(self, trainer: pl.Trainer) -> None:
        states, self._rng_to_restore = self._rng_to_restore, None
        if trainer.global_rank < len(states):
            set_rng_state(states[trainer.global_rank])
        else:
            warnings.warn(f"rank {trainer.global_rank}: the checkpoint holds no RNG state for this rank (saved "
                          "after an exception in a multi-process run): random draws will differ from the original run")
