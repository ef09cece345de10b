"""Write the slim inference checkpoint (``ldm.export``) when training ends, so a run's product is ready
for ``scripts/sample.py`` without a separate ``scripts/export.py`` step."""
from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from ldm.export import check_dtype, export_weights
from ldm.lora_export import has_adapters, merged_state_dict, save_kohya


class ExportOnTrainEnd(pl.Callback):
    """``<logdir>/<filename>`` (``logdir`` None: main.py sets the run's log dir), sd-v1 layout,
    EMA weights when the model keeps them (``ema`` None) and network weights in ``dtype``.
    A LoRA run also writes its adapters beside it (``lora.safetensors``, kohya format), and the
    export holds the merged weights.
    Skipped when a signal or a callback stopped the run early (``last.ckpt`` has the state then)."""

    def __init__(self, filename: str = "export/model.safetensors", dtype: str = "fp32", ema: bool | None = None,
                 logdir: str | None = None):
        check_dtype(dtype)
        self.filename, self.dtype, self.ema, self.logdir = filename, dtype, ema, logdir

    @rank_zero_only
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.should_stop:
            return
        path = Path(self.logdir or trainer.default_root_dir) / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        state = pl_module.exact_state_dict() if hasattr(pl_module, "exact_state_dict") else pl_module.state_dict()
        weights = {k: v.detach().cpu() for k, v in state.items()}  # frozen weights exact, never the 16-bit copies
        step = trainer.global_step
        if has_adapters(weights):  # LoRA: the adapters as a kohya file next to it, merged into the export
            alpha = pl_module.lora.scale_alpha
            save_kohya(weights, alpha, path.with_name("lora.safetensors"), {"global_step": str(step)})
            weights = merged_state_dict(weights, alpha)
        export_weights(weights, f"the model at step {step}", path, {"global_step": str(step)}, self.ema, self.dtype)
        rank_zero_info(f"exported {path} (step {trainer.global_step}, {self.dtype})")
