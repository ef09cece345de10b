"""The console of a run: one training bar that counts optimizer steps, and nothing from the libraries
that a user cannot act on.

``StepProgressBar`` replaces Lightning's per-epoch bar (which reads "Epoch 2/-2" for a run bounded
by ``max_steps``): its total is the run's number of optimizer steps (``max_steps``, or what
``max_epochs`` amounts to), it starts at the resumed step, it advances once per optimizer step (not
per batch, so ``accumulate_grad_batches`` counts right) and shows the logged losses, without
Lightning's ``v_num``. Validation bars are Lightning's.

``quiet_libraries`` drops the lines Lightning prints that say nothing about the run (advertising
tips, "TPU available: False"), and the warnings that our own, deliberate use of the libraries
triggers; everything else, warnings about the user's settings included, still reaches the console.
"""
from __future__ import annotations

import logging
import sys
import warnings
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

# (message regex, reason) of warnings our own use of the libraries triggers on purpose
OWN_USE_WARNINGS = (
    # our DataModule resumes mid-epoch itself (core/data/datamodule.py), without Lightning's help
    (r".*your dataloader is not resumable.*", "resumed by core.data"),
    # the frozen VAE (and a frozen text encoder or ViT) stay in eval mode on purpose
    (r".*module\(s\) in eval mode at the start of training.*", "frozen parts in eval mode"),
    # DreamBooth defines validation_step for configs that have validation data; most have none
    (r".*You defined a `validation_step` but have no `val_dataloader`.*", "validation is optional"),
    # Lightning's own pytree helper on this torch version; nothing of ours calls it
    (r".*isinstance\(treespec, LeafSpec\)` is deprecated.*", "inside Lightning"),
    # a run bounded by max_steps (our configs) has no epoch limit by design
    (r".*`max_epochs` was not set.*", "runs are bounded by max_steps"),
    # one data loader worker is our choice on small machines; the user sets num_workers in the config
    (r".*does not have many workers which may be a bottleneck.*", "num_workers is the config's"),
)
# Lightning's info lines that say nothing about the run
NOISE_PREFIXES = ("💡 Tip", "TPU available", "HPU available", "IPU available")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(NOISE_PREFIXES)


def quiet_libraries() -> None:
    """Install the warning filters and the log filter (idempotent)."""
    for pattern, _ in OWN_USE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in log.filters):
            log.addFilter(_DropNoise())


def total_steps(trainer: pl.Trainer) -> int | None:
    """The run's number of optimizer steps; None when it is unbounded."""
    try:
        total = trainer.estimated_stepping_batches
    except Exception:  # no data loader length (an iterable dataset)
        total = trainer.max_steps
    return int(total) if total not in (None, float("inf")) and total > 0 else None


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, counting optimizer steps over the whole run."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a resumed run starts where it stopped
        self.train_progress_bar = Tqdm(desc="train", total=total_steps(trainer), initial=trainer.global_step,
                                       position=2 * self.process_position, disable=self.is_disabled, leave=True,
                                       dynamic_ncols=True, file=sys.stdout, smoothing=0, bar_format=self.BAR_FORMAT)

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        pass  # one bar for the whole run

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        bar, step = self.train_progress_bar, trainer.global_step
        if bar is not None and not bar.disable and step != bar.n and (
                step % self.refresh_rate == 0 or step == bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics
