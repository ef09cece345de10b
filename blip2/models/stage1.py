"""BLIP-2 stage 1, the Lightning system: a frozen image encoder and the Q-Former trained with
ITC + ITM + ITG (Li et al. 2023, arXiv 2301.12597, Sec. 3.2 and 3.4).

The network is ``blip2.modules.blip2_qformer.Blip2Qformer`` (``self.model``); the losses are
``blip2.losses.stage1.stage1_losses``: total loss = itc + itm + itg. With ``freeze_vit`` the ViT
blocks are frozen (``requires_grad_(False)``, eval mode) while ``ln_vision``
(``vision_model.post_layernorm``) trains, as in LAVIS, where it sits outside the frozen encoder.
Checkpoints hold the network's weights as ``model.*`` (as ``Blip2OPTFinetune``'s do); those saved
before the network was split from the system hold them without the prefix and still resume.
Started from ``vision_weights``, checkpoints are lean (``core.lean``): the frozen ViT is left out
and they refer to that folder (path and a hash of its files); a resumed run takes those weights
from the folder it is built from (a moved one: ``model.params.vision_weights``, i.e.
``stage1.vision_weights``), after checking that it holds the recorded content, and
``blip2.loading`` reads them from the folder the checkpoint names (or ``base``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import lightning.pytorch as pl
import torch
from torch import nn

from blip2.losses.stage1 import Stage1Output, stage1_losses, world
from blip2.modules.blip2_qformer import Blip2Qformer
from blip2.processors import CLIP_MEAN, CLIP_STD
from blip2.stage1_weights import load_bert_weights, load_vision_weights
from core.lean import make_lean, restore_from_module
from core.optim import build_optimizer, check_optimizer, param_groups, with_step_schedule

MODEL_PREFIX = "model."
# the parts trained besides the two single tensors (query_tokens, temp), ln_vision or the whole ViT first
TRAINED_PARTS = ("embeddings", "qformer", "vision_projection", "text_projection", "itm_head", "lm_head")


class Blip2Stage1(pl.LightningModule):
    """Trains a ``Blip2Qformer`` built from the network arguments (``vision_config`` ...
    ``image_std``, see there) with ITC + ITM + ITG.

    ``learning_rate`` is the peak lr (main.py overwrites it from ``base_learning_rate``);
    ``scheduler_config``: ``{target, params}`` of a per-step lr multiplier (``core.schedules``).
    Optimiser: AdamW (paper: betas (0.9, 0.98), weight decay 0.05) through ``core.optim``, no decay
    on tensors with fewer than 2 dimensions (biases, norms, the temperature; LAVIS's rule);
    ``optimizer``: ``adamw`` or ``adamw8bit`` (``core.optim``).
    Initial weights (``blip2.stage1_weights``): ``vision_weights``, a BLIP-2 Hub folder whose
    ``vision_model.*`` (EVA ViT-g) are read; ``bert_weights``, a ``bert-base-uncased`` folder for the
    Q-Former; otherwise BERT's random initialisation.
    """

    def __init__(self, vision_config: Mapping[str, Any] | None = None,
                 qformer_config: Mapping[str, Any] | None = None, num_query_tokens: int = 32,
                 embed_dim: int = 256, max_txt_len: int = 32, tokenizer: str | os.PathLike | Any = None,
                 freeze_vit: bool = True, temp: float = 0.07, label_smoothing: float = 0.1,
                 learning_rate: float = 1e-4, weight_decay: float = 0.05, betas: Sequence[float] = (0.9, 0.98),
                 scheduler_config: Mapping[str, Any] | None = None, vision_weights: str | os.PathLike | None = None,
                 bert_weights: str | os.PathLike | None = None, image_mean: Sequence[float] = CLIP_MEAN,
                 image_std: Sequence[float] = CLIP_STD, optimizer: str = "adamw"):
        super().__init__()
        self.optimizer_name = check_optimizer(optimizer)
        self.model = Blip2Qformer(vision_config, qformer_config, num_query_tokens, embed_dim, max_txt_len,
                                  tokenizer, temp, image_mean, image_std)
        if vision_weights is not None:
            load_vision_weights(self.model, Path(vision_weights))
        # lean checkpoints refer to the folder the frozen ViT came from (core.lean)
        self.base_path = str(Path(vision_weights).resolve()) if vision_weights is not None else None
        if bert_weights is not None:
            load_bert_weights(self.model, Path(bert_weights))
        self.freeze_vit = freeze_vit
        self.label_smoothing = label_smoothing
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.betas = tuple(betas)
        self.scheduler_config = scheduler_config
        self.model.vision_model.requires_grad_(not freeze_vit)
        self.model.vision_model.post_layernorm.requires_grad_(True)  # ln_vision trains (LAVIS)
        self.train()

    def train(self, mode: bool = True) -> "Blip2Stage1":
        """A frozen ViT stays in eval mode (paper: frozen image encoder)."""
        super().train(mode)
        if self.freeze_vit:
            self.model.vision_model.eval()
        return self

    # ---- training ----------------------------------------------------------------------------------
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        out = stage1_losses(self.model, batch["image"], batch["text_input"], self.label_smoothing)
        self.log_losses("train", out, batch["image"].shape[0])
        return out.loss

    @torch.no_grad()
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        out = stage1_losses(self.model, batch["image"], batch["text_input"], self.label_smoothing)
        self.log_losses("val", out, batch["image"].shape[0])

    def log_losses(self, split: str, out: Stage1Output, batch_size: int) -> None:
        losses = {"loss": out.loss, "loss_itc": out.loss_itc, "loss_itm": out.loss_itm, "loss_itg": out.loss_itg}
        self.log_dict({f"{split}/{k}": v.detach() for k, v in losses.items()}, prog_bar=split == "train",
                      batch_size=batch_size, sync_dist=split == "val" and world()[1] > 1)
        if split == "train":
            self.log("train/temp", self.model.temperature().detach(), batch_size=batch_size)

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The Q-Former side (queries, temperature, text embeddings, Q-Former, projections, heads) and
        ``ln_vision``; the whole ViT when it is not frozen. Names are the network's."""
        vision = "vision_model.post_layernorm" if self.freeze_vit else "vision_model"
        named = [("query_tokens", self.model.query_tokens), ("temp", self.model.temp)]
        for part in (vision, *TRAINED_PARTS):
            named += [(f"{part}.{n}", p) for n, p in self.model.get_submodule(part).named_parameters()]
        return named

    def configure_optimizers(self):
        """AdamW over ``core.optim.param_groups`` of the trainable parameters; per-step lr schedule."""
        groups = param_groups(self.named_trainable_parameters(), self.weight_decay)
        opt = build_optimizer(groups, self.learning_rate, betas=self.betas, name=self.optimizer_name)
        return with_step_schedule(opt, self.scheduler_config)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Lean: the frozen ViT stays in the ``vision_weights`` folder (``core.lean``)."""
        if self.base_path is not None:
            make_lean(checkpoint, self, self.base_path)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint saved before the network moved to ``self.model`` holds its keys unprefixed; a
        lean one's frozen ViT is this model's own, once its ``vision_weights`` folder is checked to hold
        the content it was trained from."""
        state = checkpoint["state_dict"]
        if state and not any(k.startswith(MODEL_PREFIX) for k in state):
            checkpoint["state_dict"] = {MODEL_PREFIX + k: v for k, v in state.items()}
        source = str(getattr(self._trainer, "ckpt_path", None) or "the checkpoint")
        restore_from_module(checkpoint, self, self.base_path, source, "stage1.vision_weights")
