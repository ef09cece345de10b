"""DDPM and LatentDiffusion systems: thin LightningModules that wire a denoiser network, the
diffusion process (``schedule.py``) and, for latent diffusion, an autoencoder and a text encoder.

The state-dict keys are those of the released sd-v1 checkpoints: ``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.*``, the schedule buffers and ``model_ema.*``. A system
built from a base file (``ckpt_path``) writes lean training checkpoints (``core.lean``): its frozen
parameters are left out and read back from that file, checked by its hash, on resume.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, Mapping, Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from core.optim import build_optimizer, check_optimizer, with_step_schedule
from core.lean import BASE_KEY, frozen_keys, full_state_dict, make_lean, restore_state
from core.weights import CheckpointError, load_strict
from ldm import compat
from ldm.models.diffusion.schedule import make_beta_schedule, min_snr_weight, offset_noise, q_sample, schedule_buffers
from ldm.modules.ema import LitEma
from core.config import DTYPES, instantiate_from_config

log = logging.getLogger(__name__)

EMA_PREFIX = "model_ema."


class DiffusionWrapper(nn.Module):
    """Holds the denoiser under ``diffusion_model`` (sd-v1 key ``model.diffusion_model.*``)."""

    def __init__(self, unet_config: Mapping):
        super().__init__()
        self.diffusion_model = instantiate_from_config(unet_config)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.diffusion_model(x, t, context=context)


class DDPM(pl.LightningModule):
    """Denoising diffusion with an eps-predicting network (Ho et al. 2020).

    CompVis configs build through ``from_config_params`` (``ldm.compat``), which drops the
    parameters kept only for compatibility; the constructor takes what the model uses.
    ``image_size`` is the size the denoiser works at (latent pixels for LatentDiffusion);
    ``optimizer`` names one of ``core.optim.OPTIMIZERS`` (AdamW with its default decay on every tensor).
    Loss options (both off by default): ``snr_gamma`` weights each sample's eps loss by Min-SNR-gamma,
    ``noise_offset`` adds a per-channel offset to eps (``schedule.min_snr_weight``, ``offset_noise``).
    ``compile`` runs the denoiser through ``torch.compile`` (``compile_denoiser``), in training and sampling;
    ``channels_last`` keeps its convolution weights in channels-last order (``channels_last_denoiser``).
    """

    def __init__(self, unet_config: Mapping, timesteps: int = 1000, beta_schedule: str = "linear",
                 ckpt_path: str | None = None, ignore_keys: Sequence[str] = (), use_ema: bool = True,
                 first_stage_key: str = "image", image_size: int = 256, channels: int = 3,
                 linear_start: float = 1e-4, linear_end: float = 2e-2, cosine_s: float = 8e-3,
                 given_betas: Sequence[float] | None = None, v_posterior: float = 0.0,
                 l_simple_weight: float = 1.0, scheduler_config: Mapping | None = None,
                 ema_decay: float = 0.9999, snr_gamma: float | None = None, noise_offset: float = 0.0,
                 optimizer: str = "adamw", compile: bool = False, channels_last: bool = False):
        super().__init__()
        if (snr_gamma is not None and snr_gamma <= 0) or noise_offset < 0:
            raise ValueError(f"DDPM: snr_gamma={snr_gamma}, noise_offset={noise_offset}: expected > 0 (or null) "
                             "and >= 0")
        self.snr_gamma, self.noise_offset = snr_gamma, noise_offset
        self.optimizer_name = check_optimizer(optimizer)
        self.first_stage_key = first_stage_key
        self.image_size, self.channels = image_size, channels
        self.l_simple_weight = l_simple_weight
        self.scheduler_config = scheduler_config
        self.model = DiffusionWrapper(unet_config)
        if channels_last:
            self.channels_last_denoiser()
        if compile:
            self.compile_denoiser()
        self.use_ema = use_ema
        if use_ema:
            self.model_ema = LitEma(self.model, decay=ema_decay)
        betas = (torch.tensor(given_betas, dtype=torch.float64).numpy() if given_betas is not None
                 else make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end, cosine_s))
        self.num_timesteps = len(betas)
        # the schedule stays on the host, float32, whatever .to() / .half() / DDP do to the module: it is
        # state-dict entries (sd-v1 keys, loaded from and saved to files) but not buffers; readers move a[t]
        schedule = schedule_buffers(betas, v_posterior)
        self.schedule_keys = tuple(schedule)
        for name, value in schedule.items():
            setattr(self, name, value)
        self.learning_rate = 1e-4
        self.base_path: str | None = None  # the file init_from_ckpt loaded: lean checkpoints refer to it
        self.base_ignore_keys: tuple[str, ...] = ()
        self.base_override: str | None = None  # set_base_weights: where a resumed run's base file is now
        if ckpt_path:
            self.init_from_ckpt(ckpt_path, ignore_keys)

    def channels_last_denoiser(self) -> None:
        """The UNet's convolution weights in channels-last memory order (``torch.channels_last``), in
        place: its convolutions then take and give NHWC data (oneDNN on a CPU, cuDNN on a GPU). Values,
        parameter names and checkpoint keys stay as they are; weights loaded later keep the order
        (``copy_``), and so do their gradients and optimizer state."""
        self.model.diffusion_model.to(memory_format=torch.channels_last)

    def compile_denoiser(self) -> None:
        """``torch.compile`` the UNet in place (``nn.Module.compile``: its parameters and checkpoint keys
        stay as they are); the graph is built at the first call, and again for new input shapes."""
        self.model.diffusion_model.compile()

    @classmethod
    def from_config_params(cls, **params: Any) -> "DDPM":
        """Build from CompVis config parameters (``ldm.compat``)."""
        return cls(**compat.adapt("DDPM", params))

    # ---- the host-side schedule in the state dict ------------------------------------------------
    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in self.schedule_keys:
            destination[prefix + name] = getattr(self, name) if keep_vars else getattr(self, name).detach()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: Any, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        for name in self.schedule_keys:
            key, current = prefix + name, getattr(self, name)
            if key not in state_dict:
                missing_keys.append(key)
                continue
            value = state_dict.pop(key)  # load_state_dict passes its own copy of the caller's mapping
            if value.shape != current.shape:
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)}, "
                                  f"the model has {tuple(current.shape)}")
                continue
            with torch.no_grad():
                current.copy_(value)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # ---- weights -------------------------------------------------------------------------
    def init_from_ckpt(self, path: str, ignore_keys: Sequence[str] = (), base: str | None = None) -> None:
        """Load an sd-v1 style checkpoint (or a lean one of ours, completed from its base, ``base`` when
        that file was moved there) with strict key and shape checks (see ``load_sd_weights``); it
        becomes the base of lean checkpoints."""
        load_sd_weights(self, full_state_dict(path, base), source=str(path), ignore_keys=ignore_keys)
        self.base_path, self.base_ignore_keys = str(path), tuple(ignore_keys)

    def set_base_weights(self, path: str) -> None:
        """A resumed lean checkpoint's base file is at ``path`` now (``core.trainer``: ``--actual_resume``
        with ``--resume``); it must hold the content the checkpoint records."""
        self.base_override = str(path)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Lean: the frozen parameters loaded from the base file are left out (``core.lean``)."""
        if self.base_path is not None:
            make_lean(checkpoint, self, self.base_path, keep=self.base_ignore_keys)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A lean checkpoint's frozen parameters come back from its checked base before the strict load;
        this run's checkpoints then refer to the same base."""
        if BASE_KEY in checkpoint:
            source = getattr(self._trainer, "ckpt_path", None) or "the checkpoint"
            checkpoint["state_dict"] = restore_state(checkpoint, str(source), self.base_override)
            left_out = set(checkpoint[BASE_KEY]["keys"])
            self.base_path = self.base_override or checkpoint[BASE_KEY]["path"]
            self.base_ignore_keys = tuple(k for k in frozen_keys(self) if k not in left_out)

    @contextlib.contextmanager
    def ema_scope(self, context: str | None = None) -> Iterator[None]:
        """Run the block with the EMA weights in ``self.model``; the trained weights return after."""
        if not self.use_ema:
            yield
            return
        with self.model_ema.swapped_into(self.model):
            if context:
                log.info("%s: switched to EMA weights", context)
            yield

    # ---- process -------------------------------------------------------------------------
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        noise = torch.randn_like(x_start) if noise is None else noise
        return q_sample(x_start, t, noise, self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod)

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        return self.model(x_noisy, t, context=_as_context(cond))

    def p_losses(self, x_start: torch.Tensor, cond: Any, t: torch.Tensor,
                 noise: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Simple eps loss ||eps - eps_theta(x_t, t, c)||^2 (DDPM eq. 14), averaged per sample; with
        ``snr_gamma`` each sample weighted by min(SNR(t), gamma) / SNR(t) (logged loss_simple: unweighted)."""
        noise = offset_noise(x_start, self.noise_offset) if noise is None else noise
        eps = self.apply_model(self.q_sample(x_start, t, noise), t, cond)
        loss, per_sample = self.eps_loss(eps, noise, t)
        prefix = "train" if self.training else "val"
        return loss, {f"{prefix}/loss_simple": per_sample.mean().detach(), f"{prefix}/loss": loss.detach()}

    def eps_loss(self, eps: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss of ``p_losses`` from the predicted ``eps`` of ``noise`` at ``t``: (weighted mean, unweighted
        per-sample MSE). Systems that batch several terms through one forward split ``eps`` and call this per term."""
        per_sample = F.mse_loss(eps.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
        weighted = per_sample
        if self.snr_gamma is not None:
            weighted = per_sample * min_snr_weight(self.alphas_cumprod, t, self.snr_gamma)
        return self.l_simple_weight * weighted.mean(), per_sample

    def sample_timesteps(self, batch_size: int, device: torch.device) -> torch.Tensor:
        return torch.randint(0, self.num_timesteps, (batch_size,), device=device).long()

    # ---- data ----------------------------------------------------------------------------
    def get_input(self, batch: Mapping, key: str) -> torch.Tensor:
        """Images are stored (B, H, W, C) in [-1, 1], as the CompVis data sets give them."""
        x = batch[key]
        if x.ndim == 3:
            x = x[..., None]
        return rearrange(x, "b h w c -> b c h w").to(memory_format=torch.contiguous_format).float()

    def shared_step(self, batch: Mapping) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = self.get_input(batch, self.first_stage_key)
        return self.p_losses(x, None, self.sample_timesteps(x.shape[0], x.device))

    # ---- Lightning -----------------------------------------------------------------------
    def training_step(self, batch: Mapping, batch_idx: int) -> torch.Tensor:
        loss, logs = self.shared_step(batch)
        self.log_dict(logs, prog_bar=True, on_step=True, logger=True)
        return loss

    def validation_step(self, batch: Mapping, batch_idx: int) -> None:
        _, logs = self.shared_step(batch)
        with self.ema_scope():
            _, logs_ema = self.shared_step(batch)
        self.log_dict({**logs, **{k + "_ema": v for k, v in logs_ema.items()}}, on_epoch=True)

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        if self.use_ema:
            self.model_ema(self.model)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups; subclasses give parts their own learning rate here."""
        return [{"params": self.trainable_parameters()}]

    def configure_optimizers(self):
        opt = build_optimizer(self.param_groups(), self.learning_rate, name=self.optimizer_name)
        return with_step_schedule(opt, self.scheduler_config)


class LatentDiffusion(DDPM):
    """Diffusion in the latent space of a frozen KL autoencoder, conditioned by cross-attention on
    text embeddings (Rombach et al. 2022, arXiv 2112.10752).

    ``frozen_dtype`` (fp32 | fp16 | bf16; None: fp32) stores the frozen parameters read from the base
    file (``ckpt_path``) in that dtype while fitting, as diffusers' scripts keep the frozen models in
    ``weight_dtype``: cast at fit start (``cast_frozen``), which needs a mixed-precision trainer
    (16-mixed or bf16-mixed). Trained parameters stay fp32. Their exact fp32 values stay in the base
    file: lean checkpoints leave them out and ``exact_state_dict`` (exports) reads them back from it.
    """

    def __init__(self, first_stage_config: Mapping, cond_stage_config: Mapping, cond_stage_key: str = "txt",
                 cond_stage_trainable: bool = False, scale_factor: float = 1.0, scale_by_std: bool = False,
                 frozen_dtype: str | None = "fp32", **kwargs: Any):
        ckpt_path = kwargs.pop("ckpt_path", None)  # loaded below, once every sub-model exists
        ignore_keys = kwargs.pop("ignore_keys", ())
        frozen_dtype = "fp32" if frozen_dtype is None else frozen_dtype
        if frozen_dtype not in DTYPES:
            raise ValueError(f"{type(self).__name__}: frozen_dtype={frozen_dtype!r}: expected one of "
                             f"{', '.join(DTYPES)} (or null: fp32)")
        super().__init__(**kwargs)
        self.frozen_dtype = frozen_dtype
        self.cast_keys: tuple[str, ...] = ()  # the parameters cast_frozen stored in frozen_dtype
        self.cond_stage_key, self.cond_stage_trainable = cond_stage_key, cond_stage_trainable
        self.scale_by_std = scale_by_std
        if scale_by_std:
            self.register_buffer("scale_factor", torch.tensor(scale_factor))
        else:
            self.scale_factor = scale_factor
        self.first_stage_model = instantiate_from_config(first_stage_config)
        freeze(self.first_stage_model)
        self.cond_stage_model = instantiate_from_config(cond_stage_config)
        if cond_stage_trainable:  # the system decides, whatever the encoder's own default
            self.cond_stage_model.requires_grad_(True)
        else:
            freeze(self.cond_stage_model)
        self.restarted_from_ckpt = bool(ckpt_path)  # then scale_factor comes from the checkpoint
        if ckpt_path:
            self.init_from_ckpt(ckpt_path, ignore_keys)

    @classmethod
    def from_config_params(cls, **params: Any) -> "LatentDiffusion":
        """Build from CompVis config parameters (``ldm.compat``)."""
        return cls(**compat.adapt("LatentDiffusion", params))

    def train(self, mode: bool = True) -> "LatentDiffusion":
        """Frozen parts stay in eval mode whatever the system's mode."""
        super().train(mode)
        self.first_stage_model.eval()
        if not self.cond_stage_trainable:
            self.cond_stage_model.eval()
        return self

    # ---- frozen weights in 16 bit ----------------------------------------------------------
    def cast_frozen(self, without_base: bool = False) -> list[str]:
        """Store the frozen parameters that came from the base file in ``frozen_dtype`` (the LoRA base
        weights too; adapters and other trained parameters stay as they are); returns their keys.
        Without a base file nothing is cast, as the exact values would exist nowhere else, unless
        ``without_base`` (measurements: ``benchmarks/memory_sd.py``)."""
        dtype = DTYPES[self.frozen_dtype]
        if dtype == torch.float32 or (self.base_path is None and not without_base):
            return []
        keys = frozen_keys(self, self.base_ignore_keys)
        params = dict(self.named_parameters(remove_duplicate=False))
        for key in keys:
            params[key].data = params[key].data.to(dtype)
        self.cast_keys = tuple(keys)
        return keys

    def exact_state_dict(self) -> dict[str, torch.Tensor]:
        """``state_dict()`` with the parameters ``cast_frozen`` rounded read back from the base file, exact;
        each must round to the weight in memory (else the file is not the one trained from)."""
        state = self.state_dict()
        if not self.cast_keys:
            return state
        base = full_state_dict(self.base_path)
        for key in self.cast_keys:
            if key not in base or not torch.equal(base[key].to(state[key].device, state[key].dtype), state[key]):
                raise CheckpointError(f"{self.base_path}: {key} is missing or is not the frozen weight trained "
                                      "with (the base file changed since training started?)")
            state[key] = base[key]
        return state

    def on_fit_start(self) -> None:
        """``frozen_dtype``: the frozen weights to 16 bit, under a mixed-precision trainer only."""
        if self.frozen_dtype == "fp32":
            return
        precision = str(self.trainer.precision)
        if not precision.endswith("-mixed"):
            raise ValueError(f"{type(self).__name__}: frozen_dtype={self.frozen_dtype} needs mixed precision "
                             f"(trainer precision 16-mixed or bf16-mixed), got precision={precision}")
        keys = self.cast_frozen()
        log.info("frozen_dtype=%s: %d frozen parameters stored in %s", self.frozen_dtype, len(keys), self.frozen_dtype)

    # ---- conditioning and first stage ------------------------------------------------------
    def get_learned_conditioning(self, c: Sequence[str]) -> torch.Tensor:
        """Text prompts -> cross-attention context [B, 77, 768]."""
        return self.cond_stage_model.encode(list(c))

    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor):
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, encoder_posterior: Any,
                                 generator: torch.Generator | None = None) -> torch.Tensor:
        """z = scale_factor * a sample of the posterior (or the tensor itself)."""
        if isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        else:
            z = encoder_posterior.sample(generator=generator)
        return self.scale_factor * z

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        return self.first_stage_model.decode(z / self.scale_factor)

    @torch.no_grad()
    def on_train_batch_start(self, batch: Mapping, batch_idx: int) -> None:
        """With ``scale_by_std``, set scale_factor = 1 / std(z) from the first batch (LDM paper, sec. 4.3),
        unless the weights (and so the scale factor) came from ``ckpt_path``, as CompVis."""
        if (self.scale_by_std and self.global_step == 0 and batch_idx == 0 and self.current_epoch == 0
                and not self.restarted_from_ckpt):
            x = self.get_input(batch, self.first_stage_key).to(self.device)
            z = self.get_first_stage_encoding(self.encode_first_stage(x)) / self.scale_factor
            self.scale_factor.fill_(1.0 / z.flatten().std().item())

    def shared_step(self, batch: Mapping) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = self.get_input(batch, self.first_stage_key)
        z = self.get_first_stage_encoding(self.encode_first_stage(x)).detach()
        c = self.get_learned_conditioning(batch[self.cond_stage_key])
        return self.p_losses(z, c, self.sample_timesteps(z.shape[0], z.device))

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = super().trainable_parameters()
        if self.cond_stage_trainable:
            params += [p for p in self.cond_stage_model.parameters() if p.requires_grad]
        return params


def freeze(module: nn.Module) -> nn.Module:
    module.eval()
    return module.requires_grad_(False)


def _as_context(cond: Any) -> torch.Tensor | None:
    """Accept the CompVis forms: a tensor, a list of tensors, or {'c_crossattn': [tensor]}."""
    if isinstance(cond, Mapping):
        cond = cond["c_crossattn"]
    if isinstance(cond, (list, tuple)):
        cond = torch.cat(list(cond), dim=1)
    return cond


def load_sd_weights(model: DDPM, state: dict[str, torch.Tensor], source: str,
                    ignore_keys: Sequence[str] = ()) -> None:
    """Load sd-v1 weights strictly: every key the model expects must be present with its shape, and
    every key in the file must be used. Accepted on purpose: keys starting with an ``ignore_keys``
    prefix (dropped from the file, may be absent); ``model_ema.*`` when the model keeps no EMA; a file
    without ``model_ema.*`` for a model with EMA (the EMA then starts from the loaded weights)."""
    ignore = tuple(ignore_keys)
    state = {k: v for k, v in state.items() if not k.startswith(ignore)}
    has_ema = any(k.startswith(EMA_PREFIX) for k in state)
    if not model.use_ema:
        state = {k: v for k, v in state.items() if not k.startswith(EMA_PREFIX)}
    optional = ignore + ((EMA_PREFIX,) if model.use_ema and not has_ema else ())
    load_strict(model, state, source, optional=optional)
    if model.use_ema and not has_ema:
        model.model_ema.reset_from(model.model)
