"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, arXiv 2112.10752, sec. 3):
x -> q(z|x) = N(mu, sigma^2) in a latent space f times smaller, z -> x_hat.

A plain ``nn.Module`` with the CompVis constructor and checkpoint keys (``encoder.*``, ``decoder.*``,
``quant_conv.*``, ``post_quant_conv.*``); in sd-v1 it sits frozen under ``first_stage_model.``.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from core.weights import load_state_dict, load_strict
from ldm import compat
from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution


class AutoencoderKL(nn.Module):
    """CompVis ``AutoencoderKL``: ``ddconfig`` builds the Encoder and Decoder; ``embed_dim`` is the latent width.

    CompVis configs build through ``from_config_params`` (``ldm.compat``), which drops ``lossconfig``
    (the training loss is not part of this module) and ``monitor``. ``ckpt_path`` loads weights
    strictly after dropping keys that start with any of ``ignore_keys`` (the released kl-f8 file
    also carries ``loss.*``: pass ``ignore_keys=["loss"]``).
    """

    def __init__(self, ddconfig: Mapping[str, Any], embed_dim: int,
                 ckpt_path: str | os.PathLike | None = None, ignore_keys: Sequence[str] = (),
                 image_key: str = "image"):
        super().__init__()
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL: ddconfig.double_z must be true (the encoder predicts mean and log-variance)")
        self.image_key = image_key
        self.embed_dim = embed_dim
        self.factor = downsampling_factor(ddconfig)  # image size / latent size
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys)

    @classmethod
    def from_config_params(cls, **params: Any) -> "AutoencoderKL":
        """Build from CompVis config parameters (``ldm.compat``)."""
        return cls(**compat.adapt("AutoencoderKL", params))

    def init_from_ckpt(self, path: str | os.PathLike, ignore_keys: Sequence[str] = ()) -> None:
        """Load ``path`` (``.ckpt`` or ``.safetensors``) strictly, without the keys under ``ignore_keys``."""
        prefixes = tuple(ignore_keys)
        state = {k: v for k, v in load_state_dict(path).items() if not k.startswith(prefixes)}
        load_strict(self, state, str(path))

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        moments = self.quant_conv(self.encoder(x))  # (B, 2*embed_dim, H/f, W/f)
        return DiagonalGaussianDistribution(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))  # (B, out_ch, f h, f w)

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """Reconstruct ``x`` through a posterior sample (or its mean); returns (x_hat, posterior)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()  # (B, embed_dim, H/f, W/f)
        return self.decode(z), posterior


def downsampling_factor(ddconfig: Mapping[str, Any]) -> int:
    """f = 2 ** (number of resolution levels - 1): image size / latent size (8 for sd-v1)."""
    return 2 ** (len(ddconfig["ch_mult"]) - 1)
