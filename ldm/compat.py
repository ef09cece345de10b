"""The one adapter between CompVis config parameters and our constructors.

CompVis configs (``configs/v1-inference.yaml``, the DreamBooth-Stable-Diffusion ones, users' own)
pass parameters that our classes do not use. ``core.config.instantiate_from_config`` builds a class
through its ``from_config_params(**params)`` when it has one; ours call :func:`adapt`, which

1. drops the parameters that are IGNORED (accepted whatever their value: they change nothing here),
2. checks those that are only SUPPORTED at one value and drops them (another value is a
   ``ValueError`` naming the parameter),
3. leaves everything else to the constructor, which rejects what it does not know (``TypeError``).

The constructors therefore show only what the model uses.
"""
from __future__ import annotations

from typing import Any, Mapping

# CompVis ``DDPM``: the samplers take their own ``log_every_t``; eps-prediction never clips x_0;
# ``monitor`` named CompVis main.py's checkpoint metric (ours: lightning.checkpoint); ``logvar_init``
# only matters with ``learn_logvar``; ``conditioning_key`` is implied by the model (crossattn or none).
DDPM_IGNORED = ("log_every_t", "clip_denoised", "monitor", "logvar_init")
DDPM_SUPPORTED = {"loss_type": ("l2",), "parameterization": ("eps",), "original_elbo_weight": (0.0,),
                  "learn_logvar": (False,), "use_positional_encodings": (False,), "load_only_unet": (False,),
                  "conditioning_key": (None, "crossattn")}
# CompVis ``LatentDiffusion``: ``concat_mode`` only chose a conditioning_key CompVis's sd-v1 overrides.
LATENT_IGNORED = DDPM_IGNORED + ("concat_mode",)
LATENT_SUPPORTED = {**DDPM_SUPPORTED, "num_timesteps_cond": (1,), "cond_stage_forward": (None,)}
# CompVis ``UNetModel``: ``image_size`` (the latent size), ``num_heads_upsample`` and
# ``use_new_attention_order`` have no effect on a spatial-transformer UNet (nor in CompVis).
UNET_IGNORED = ("image_size", "num_heads_upsample", "use_new_attention_order")
UNET_SUPPORTED = {"num_classes": (None,), "n_embed": (None,), "dims": (2,), "use_fp16": (False,),
                  "use_scale_shift_norm": (False,), "resblock_updown": (False,), "conv_resample": (True,),
                  "use_spatial_transformer": (True,)}
# CompVis ``AutoencoderKL``: the training loss (``lossconfig``) is not part of the network.
AUTOENCODER_IGNORED = ("lossconfig", "monitor")

RULES: dict[str, tuple[tuple[str, ...], Mapping[str, tuple[Any, ...]]]] = {
    "DDPM": (DDPM_IGNORED, DDPM_SUPPORTED),
    "LatentDiffusion": (LATENT_IGNORED, LATENT_SUPPORTED),
    "UNetModel": (UNET_IGNORED, UNET_SUPPORTED),
    "AutoencoderKL": (AUTOENCODER_IGNORED, {}),
}


def adapt(owner: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` without the compatibility-only parameters of ``owner`` (a key of ``RULES``)."""
    ignored, supported = RULES[owner]
    for name, values in supported.items():
        if name in params and params[name] not in values:
            only = " or ".join(f"{name}={v!r}" for v in values)
            raise ValueError(f"{owner}: {name}={params[name]!r} is not implemented; only {only} (as in sd-v1)")
    return {k: v for k, v in params.items() if k not in ignored and k not in supported}


def dreambooth_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """DreamBooth: LatentDiffusion's rules; ``cond_stage_trainable`` is implied by ``train_text_encoder``
    and accepted only when it agrees."""
    params = adapt("LatentDiffusion", params)
    trainable = params.pop("cond_stage_trainable", None)
    train_text_encoder = params.get("train_text_encoder", True)
    if trainable is not None and trainable != train_text_encoder:
        raise ValueError(f"DreamBooth: cond_stage_trainable={trainable} contradicts train_text_encoder="
                         f"{train_text_encoder}; set train_text_encoder only")
    return params
