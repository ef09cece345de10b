"""Write the slim inference checkpoint (``ldm.export``) when training ends, so a run's product is ready
for ``scripts/sample.py`` without a separate ``scripts/export.py`` step."""
from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from ldm.export import inference_state_dict, save_inference_checkpoint
from ldm.util import DTYPES


class ExportOnTrainEnd(pl.Callback):
    """``<logdir>/<filename>`` (``logdir`` None: main.py sets the run's log dir), sd-v1 layout,
    EMA weights when the model keeps them (``ema`` None) and network weights in ``dtype``.
    Skipped when a signal or a callback stopped the run early (``last.ckpt`` has the state then)."""

    def __init__(self, filename: str = "export/model.safetensors", dtype: str = "fp32", ema: bool | None = None,
                 logdir: str | None = None):
        if dtype not in DTYPES:
            raise ValueError(f"ExportOnTrainEnd: dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
        self.filename, self.dtype, self.ema, self.logdir = filename, dtype, ema, logdir

    @rank_zero_only
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.should_stop:
            return
        path = Path(self.logdir or trainer.default_root_dir) / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in pl_module.state_dict().items()}
        state = inference_state_dict(state, f"step {trainer.global_step}", self.ema, DTYPES[self.dtype])
        ema = self.ema if self.ema is not None else getattr(pl_module, "use_ema", False)
        save_inference_checkpoint(state, path, {"global_step": str(trainer.global_step), "dtype": self.dtype,
                                                "ema": str(bool(ema)).lower()})
        rank_zero_info(f"exported {path} (step {trainer.global_step}, {self.dtype})")
