"""DreamBooth (Ruiz et al. 2022, arXiv 2208.12242) on Stable Diffusion v1: fine-tune the UNet (and,
optionally, the text encoder) on a few images of one subject, with the class-specific
prior-preservation loss of Eq. 2:

    L = E ||eps - eps_theta(z_t, t, c_instance)||^2 + lambda * E ||eps' - eps_theta(z'_t', t', c_class)||^2

where ``c_instance`` encodes "a photo of [identifier] [class]" and ``c_class`` "a photo of a [class]",
the second term on images the base model generated of the class, and lambda = ``prior_loss_weight``.

Layout: by default one forward of the UNet per step on both halves of the batch, concatenated (as
diffusers' train_dreambooth.py); ``separate_forwards`` runs one forward per half instead (as
XavierXiao's DreamBooth-Stable-Diffusion), with the same draws, context and losses. Under autocast two
forwards would share the cached 16-bit weight copies and, without gradient checkpointing, the backward
would hold 16-bit gradients of every trained weight until both halves were done; two smaller
forwards peak lower in activation memory. ``benchmarks/bench_dreambooth.py`` times both. Each half draws from
the global torch RNG in a fixed order: the posterior sample of z, then t ~ U{0..T-1}, then eps ~ N(0, I)
(``offset_noise``); the instance half first. A resumed run that restores the RNG state therefore
reproduces the draws. The prompts of both halves are encoded together, the prediction is split back
and each half's loss is ``LatentDiffusion.eps_loss``, the one definition of the eps loss (Min-SNR
weighting per half, as ``p_losses``).

Caches (derived data, never saved in checkpoints):
- frozen text encoder: each distinct prompt is encoded alone (so the result does not depend on
  which prompts shared its batch), and the stacked batch is kept by its list of prompts (the last
  ``PROMPT_CACHE`` lists): the device holds one conditioning batch, no per-prompt copies beside it.
- trained text encoder: nothing is cached, but each distinct prompt of a step is encoded once and
  repeated for the rows that share it (DreamBooth's batches repeat one instance and one class
  prompt); the repeated rows' gradients add up in the index's backward, as they would over
  separate encodings. Only for an encoder without active dropout (CLIP's has none), where a
  prompt's encoding is the same in every row.
- ``cache_latents`` (on in ``configs/dreambooth.yaml``): the VAE posterior moments of each distinct
  image, keyed by a digest of its pixels (``core.images.image_digest``): the data set's ``image_digest``
  of each item, computed in the loader's workers, or, for a batch without one, the digest of the
  image tensor here. A random flip or crop gives other pixels and so another entry; the cache is
  therefore correct for any augmentation, but only pays off when the items repeat (center crop: at
  most 2 entries per image with flips; sd-v1 at 512 px: 128 KiB each). The posterior is still
  sampled every step, as without the cache.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from core.images import image_digest
from ldm import compat
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.models.diffusion.schedule import offset_noise
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.lora import TEXT_ATTENTION, LoRAConfig

PROMPT_CACHE = 8  # conditioning batches a frozen text encoder keeps (by their prompt lists)


def lora_settings(lora: Mapping[str, Any], train_text_encoder: bool, use_ema: bool) -> LoRAConfig:
    """The ``lora:`` settings, checked against the other DreamBooth parameters."""
    config = LoRAConfig.from_mapping(lora, "DreamBooth: lora")
    if config.text_encoder != train_text_encoder:
        raise ValueError(f"DreamBooth: lora.text_encoder={config.text_encoder} but train_text_encoder="
                         f"{train_text_encoder}: with LoRA the text encoder trains only through its adapters")
    if use_ema:
        raise ValueError("DreamBooth: lora with use_ema is not implemented; set use_ema: false")
    return config


class DreamBooth(LatentDiffusion):
    """LatentDiffusion trained on ``{"instance": {...}, "class": {...}}`` batches (class optional).

    ``train_text_encoder`` trains the CLIP text encoder too (its own learning rate ``text_encoder_lr``,
    None = the UNet's); the VAE is always frozen. Every other argument is LatentDiffusion's but
    ``cond_stage_trainable``, which ``train_text_encoder`` sets.

    ``lora`` (``ldm.modules.lora.LoRAConfig`` settings; None: full fine-tuning) freezes the UNet and
    the text encoder and trains only low-rank adapters on them: on the UNet's ``unet_targets``, and on
    the text encoder's attention when ``lora.text_encoder`` (which ``train_text_encoder`` must match).
    The base checkpoint loads before the adapters exist, so its keys stay the sd-v1 keys.

    ``separate_forwards``: one UNet forward per half of the batch instead of one on both (see above).
    """

    def __init__(self, *, prior_loss_weight: float = 1.0, train_text_encoder: bool = True,
                 text_encoder_lr: float | None = None, cache_latents: bool = False,
                 lora: Mapping[str, Any] | None = None, separate_forwards: bool = False, **kwargs: Any):
        if prior_loss_weight < 0:
            raise ValueError(f"DreamBooth: prior_loss_weight must be >= 0, got {prior_loss_weight}")
        if text_encoder_lr is not None and not train_text_encoder:
            raise ValueError("DreamBooth: text_encoder_lr is set but train_text_encoder is false")
        lora_config = None if lora is None else lora_settings(lora, train_text_encoder, kwargs.get("use_ema", True))
        super().__init__(cond_stage_trainable=train_text_encoder, **kwargs)
        self.prior_loss_weight = prior_loss_weight
        self.train_text_encoder = train_text_encoder
        self.text_encoder_lr = text_encoder_lr
        self.cache_latents = cache_latents
        self.separate_forwards = separate_forwards
        self.model.requires_grad_(True)  # LatentDiffusion froze the VAE and set the text encoder as asked
        self.lora = lora_config
        if lora_config is not None:
            lora_config.inject(self.model.diffusion_model, lora_config.unet_targets)
            if lora_config.text_encoder:
                lora_config.inject(self.cond_stage_model.transformer, TEXT_ATTENTION)
        self._prompt_cache: dict[tuple[str, ...], torch.Tensor] = {}  # insertion order = use order
        self._moment_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def from_config_params(cls, **params: Any) -> "DreamBooth":
        """Build from CompVis config parameters (``ldm.compat``; ``cond_stage_trainable`` only when it
        agrees with ``train_text_encoder``)."""
        return cls(**compat.dreambooth_params(params))

    # ---- inputs --------------------------------------------------------------------------------
    def conditioning(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> c [B, 77, D]; a frozen encoder encodes each distinct prompt alone, and the batch
        it stacks is kept for the next batch of the same prompts (the last ``PROMPT_CACHE`` lists), so
        the device holds one conditioning batch, as a run that encodes every step does at its peak;
        a trained one encodes each distinct prompt of the step once (module docstring)."""
        if self.train_text_encoder:
            distinct = list(dict.fromkeys(prompts))
            if len(distinct) == len(prompts) or self.text_dropout():
                return self.get_learned_conditioning(prompts)
            row = {p: i for i, p in enumerate(distinct)}
            return self.get_learned_conditioning(distinct)[[row[p] for p in prompts]]  # (B, 77, D)
        key = tuple(prompts)
        c = self._prompt_cache.pop(key, None)
        if c is None:
            with torch.no_grad():
                alone = {p: self.get_learned_conditioning([p])[0] for p in dict.fromkeys(prompts)}  # (77, D)
                c = torch.stack([alone[p] for p in prompts]).to(self.device)  # (B, 77, D)
            while len(self._prompt_cache) >= PROMPT_CACHE:
                self._prompt_cache.pop(next(iter(self._prompt_cache)))  # least recently used
        self._prompt_cache[key] = c
        return c

    def text_dropout(self) -> bool:
        """Does the text encoder drop anything out now (then each row needs its own encoding)?"""
        return self.cond_stage_model.training and any(
            isinstance(m, torch.nn.Dropout) and m.p > 0 for m in self.cond_stage_model.modules())

    @torch.no_grad()
    def posterior(self, x: torch.Tensor, keys: Sequence[str] | None = None) -> DiagonalGaussianDistribution:
        """q(z | x) of the frozen VAE; with ``cache_latents`` each distinct image is encoded once.
        ``keys``: the images' ``<first_stage_key>_digest`` as the data set gave them (else digests of
        ``x`` here)."""
        if not self.cache_latents:
            return self.encode_first_stage(x)
        if keys is None:
            keys = [image_digest(img) for img in x]
        elif len(keys) != x.shape[0]:
            raise ValueError(f"{self.first_stage_key}_digest: {len(keys)} digests for a batch of {x.shape[0]} images")
        new = {k: i for i, k in enumerate(keys) if k not in self._moment_cache}
        for k, i in new.items():  # one at a time: the entry does not depend on the batch it came in
            self._moment_cache[k] = self.encode_first_stage(x[i:i + 1]).parameters[0]  # (2 z_channels, h, w)
        return DiagonalGaussianDistribution(torch.stack([self._moment_cache[k] for k in keys]))

    def latents(self, x: torch.Tensor, keys: Sequence[str] | None = None) -> torch.Tensor:
        """z = scale_factor * (a sample of q(z | x)), in the images' dtype (autocast may encode in 16 bit)."""
        return self.get_first_stage_encoding(self.posterior(x, keys)).detach().to(x.dtype)  # (B, 4, H/8, W/8)

    def draws(self, part: Mapping) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z, t, eps) of one half of the batch, drawn in the documented order: posterior sample, t, eps."""
        z = self.latents(self.get_input(part, self.first_stage_key), part.get(f"{self.first_stage_key}_digest"))
        t = self.sample_timesteps(z.shape[0], z.device)
        return z, t, offset_noise(z, self.noise_offset)

    def denoising_losses(self, *parts: Mapping) -> list[torch.Tensor]:
        """The eps loss of each part (half of the batch): one UNet forward on all of them, or one per
        part with ``separate_forwards``; the prompts of all parts are encoded together."""
        draws = [self.draws(part) for part in parts]  # [(z, t, eps)] per part
        sizes = [len(part[self.cond_stage_key]) for part in parts]
        c = self.conditioning([p for part in parts for p in part[self.cond_stage_key]])  # (B_all, 77, D)
        if self.separate_forwards:
            eps = [self.apply_model(self.q_sample(z, t, noise), t, c_part)
                   for (z, t, noise), c_part in zip(draws, c.split(sizes))]
        else:
            z, t, noise = (torch.cat(x) for x in zip(*draws))
            eps = self.apply_model(self.q_sample(z, t, noise), t, c).split(sizes)
        return [self.eps_loss(e, noise, t)[0] for e, (_, t, noise) in zip(eps, draws)]

    # ---- Lightning -----------------------------------------------------------------------------
    def training_step(self, batch: Mapping, batch_idx: int) -> torch.Tensor:
        """DreamBooth Eq. 2: instance loss plus ``prior_loss_weight`` times the class (prior) loss."""
        if "class" not in batch:
            (loss_instance,) = self.denoising_losses(batch["instance"])
            loss, logs = loss_instance, {"train/loss_instance": loss_instance.detach()}
        else:
            loss_instance, loss_class = self.denoising_losses(batch["instance"], batch["class"])
            loss = loss_instance + self.prior_loss_weight * loss_class
            logs = {"train/loss_instance": loss_instance.detach(), "train/loss_class": loss_class.detach()}
        logs["train/loss"] = loss.detach()
        self.log_dict(logs, prog_bar=True, on_step=True, batch_size=len(batch["instance"][self.cond_stage_key]))
        return loss

    def on_train_batch_start(self, batch: Mapping, batch_idx: int) -> None:
        """``scale_by_std`` measures the instance images."""
        super().on_train_batch_start(batch["instance"], batch_idx)

    def on_fit_start(self) -> None:
        """Weights may have been restored since the caches were filled; ``frozen_dtype`` casts."""
        super().on_fit_start()
        self._prompt_cache.clear()
        self._moment_cache.clear()

    def param_groups(self) -> list[dict[str, Any]]:
        """The UNet, and the text encoder with its own learning rate when it is trained."""
        groups = [{"name": "unet", "params": [p for p in self.model.parameters() if p.requires_grad]}]
        if self.train_text_encoder:
            lr = self.learning_rate if self.text_encoder_lr is None else self.text_encoder_lr
            params = [p for p in self.cond_stage_model.parameters() if p.requires_grad]
            groups.append({"name": "text_encoder", "params": params, "lr": lr})
        return groups
