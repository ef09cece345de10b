"""Training the KL autoencoder (Rombach et al. 2022, arXiv 2112.10752, sec. 3 and app. G).

``AutoencoderKLTraining`` is ``AutoencoderKL`` plus a Lightning training loop, with the same
checkpoint keys (``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``), so a run's
``last.ckpt`` is a ``first_stage_config.params.ckpt_path`` for a latent-diffusion config as it is.

Loss, per image: L = sum_pixels |x - x_hat| + kl_weight * KL(q(z|x) || N(0, I)), averaged over the
batch (CompVis ``LPIPSWithDiscriminator`` with logvar 0 and without its perceptual and adversarial
terms, which sharp photographs need and the toy world's flat shapes do not).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from einops import rearrange

from core.optim import build_optimizer, check_optimizer
from ldm.models.autoencoder import AutoencoderKL


class AutoencoderKLTraining(AutoencoderKL, pl.LightningModule):
    """``learning_rate`` is set by main.py from ``base_learning_rate``; Adam with betas (0.5, 0.9) as CompVis
    (``core.optim``'s ``optimizer``, without weight decay: AdamW then is Adam)."""

    def __init__(self, ddconfig: Mapping[str, Any], embed_dim: int, kl_weight: float = 1e-6,
                 learning_rate: float = 4.5e-6, optimizer: str = "adamw", **kwargs: Any):
        super().__init__(ddconfig, embed_dim, **kwargs)
        self.kl_weight, self.learning_rate = kl_weight, learning_rate
        self.optimizer_name = check_optimizer(optimizer)

    def get_input(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """(B, H, W, C) in [-1, 1], the CompVis data-set convention -> (B, C, H, W)."""
        return rearrange(batch[self.image_key], "b h w c -> b c h w").float()

    def losses(self, x: torch.Tensor, split: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x_hat, posterior = self(x)
        rec = (x - x_hat).abs().sum(dim=(1, 2, 3)).mean()
        kl = posterior.kl().mean()
        loss = rec + self.kl_weight * kl
        logs = {f"{split}/rec_loss": rec.detach(), f"{split}/kl_loss": kl.detach(), f"{split}/loss": loss.detach(),
                f"{split}/l1_per_pixel": rec.detach() / x[0].numel()}
        return loss, logs

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        loss, logs = self.losses(self.get_input(batch), "train")
        self.log_dict(logs, prog_bar=True, on_step=True)
        return loss

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        _, logs = self.losses(self.get_input(batch), "val")
        self.log_dict(logs, on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = [{"params": list(self.parameters())}]
        return build_optimizer(groups, self.learning_rate, betas=(0.5, 0.9), weight_decay=0.0, name=self.optimizer_name)
