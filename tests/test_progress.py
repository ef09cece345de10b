"""core.callbacks.progress.StepProgressBar: one bar over the run's optimizer steps, resumed where it stopped."""
from __future__ import annotations

import re

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from core.callbacks.progress import StepProgressBar


class Linear(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).square().mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(tmp_path, max_steps: int, ckpt: str | None = None) -> pl.Trainer:
    data = DataLoader(TensorDataset(torch.randn(6, 2)), batch_size=2)  # 3 batches an epoch
    trainer = pl.Trainer(max_steps=max_steps, accumulate_grad_batches=2, callbacks=[StepProgressBar()],
                         logger=False, enable_checkpointing=False, enable_model_summary=False,
                         default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(Linear(), data, ckpt_path=ckpt, weights_only=True)
    return trainer


def bar_counts(text: str) -> list[tuple[int, int]]:
    return [(int(n), int(t)) for n, t in re.findall(r"train:.*?\| (\d+)/(\d+) ", text.replace("\r", "\n"))]


def test_the_bar_counts_optimizer_steps_of_max_steps_across_epochs_and_resumes(tmp_path, capsys):
    trainer = fit(tmp_path, 4)  # 4 optimizer steps = 8 batches over 3 epochs
    out = capsys.readouterr().out
    counts = bar_counts(out)
    assert counts[0] == (0, 4) and counts[-1] == (4, 4), counts
    assert {t for _, t in counts} == {4} and sorted(n for n, _ in counts) == [n for n, _ in counts]
    assert "Epoch" not in out and "v_num" not in out and "train/loss=" in out
    trainer.save_checkpoint(tmp_path / "at4.ckpt")
    fit(tmp_path, 6, str(tmp_path / "at4.ckpt"))
    counts = bar_counts(capsys.readouterr().out)
    assert counts[0] == (4, 6) and counts[-1] == (6, 6), counts
