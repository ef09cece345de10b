"""Convolutional encoder and decoder of the KL autoencoder (Rombach et al. 2022, arXiv 2112.10752,
sec. 3 "Perceptual Image Compression" and app. G; the network of Esser et al. 2021, VQGAN).

Module names follow CompVis ``ldm/modules/diffusionmodules/model.py`` so that the released sd-v1
weights load strictly under ``first_stage_model.encoder.*`` and ``first_stage_model.decoder.*``:
``down.{i}`` / ``up.{i}`` hold level ``i`` at resolution ``resolution / 2**i`` (the decoder runs
its ``up`` list from the last index down to 0), each with ``block.{j}`` (ResnetBlock) and, at
attention resolutions, ``attn.{j}`` (AttnBlock), then ``downsample`` / ``upsample``.
Normalisation is GroupNorm(32 groups, eps 1e-6); the non-linearity is swish (SiLU).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups and eps 1e-6, the only normalisation in the autoencoder."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: x + conv(swish(norm(conv(swish(norm(x)))))), 1x1 skip on width change."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))  # (B, C_out, H, W)
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, q/k/v/out as 1x1 convolutions, residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q, k, v = (rearrange(f(h), "b c h w -> b 1 (h w) c") for f in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, H*W, C), softmax(q k^T / sqrt(C)) v
        out = rearrange(out, "b 1 (h w) c -> b c h w", h=x.shape[2])
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve H and W: zero-pad right and bottom by one, then a 3x3 stride-2 conv (or 2x2 average pool)."""

    def __init__(self, channels: int, with_conv: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return F.avg_pool2d(x, kernel_size=2, stride=2)  # (B, C, H/2, W/2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour interpolation, then a 3x3 conv."""

    def __init__(self, channels: int, with_conv: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if with_conv else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class Level(nn.Module):
    """One resolution level: ``num_blocks`` ResnetBlocks, each followed by an AttnBlock if ``with_attn``."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, with_attn: bool, dropout: float):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(widths[j], out_channels, dropout) for j in range(num_blocks))
        self.attn = nn.ModuleList(AttnBlock(out_channels) for _ in range(num_blocks if with_attn else 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for j, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[j](x)
        return x


class DownLevel(Level):
    """An encoder level, then ``downsample`` unless it is the last level."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, with_attn: bool, dropout: float,
                 downsample: bool, resamp_with_conv: bool):
        super().__init__(in_channels, out_channels, num_blocks, with_attn, dropout)
        self.downsample = Downsample(out_channels, resamp_with_conv) if downsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(super().forward(x))


class UpLevel(Level):
    """A decoder level, then ``upsample`` unless it is level 0 (full resolution)."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, with_attn: bool, dropout: float,
                 upsample: bool, resamp_with_conv: bool):
        super().__init__(in_channels, out_channels, num_blocks, with_attn, dropout)
        self.upsample = Upsample(out_channels, resamp_with_conv) if upsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsample(super().forward(x))


class MidBlock(nn.Module):
    """The bottleneck at the lowest resolution: ResnetBlock, AttnBlock, ResnetBlock."""

    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> (B, 2 z_channels or z_channels, H/f, W/f), f = 2**(len(ch_mult)-1).

    Takes the whole CompVis ``ddconfig`` so one dict builds both halves; ``out_ch``,
    ``give_pre_end`` and ``tanh_out`` belong to the decoder and are not used here.
    """

    def __init__(self, *, ch: int = 128, out_ch: int = 3, ch_mult: Sequence[int] = (1, 2, 4, 4),
                 num_res_blocks: int = 2, attn_resolutions: Sequence[int] = (), dropout: float = 0.0,
                 resamp_with_conv: bool = True, in_channels: int = 3, resolution: int = 256,
                 z_channels: int = 4, double_z: bool = True, give_pre_end: bool = False, tanh_out: bool = False):
        super().__init__()
        widths = [ch * m for m in ch_mult]
        in_widths = [ch] + widths[:-1]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList(
            DownLevel(in_widths[i], widths[i], num_res_blocks, res in tuple(attn_resolutions), dropout,
                      downsample=i != last, resamp_with_conv=resamp_with_conv)
            for i, res in enumerate(encoder_resolutions(resolution, len(widths)))
        )
        self.mid = MidBlock(widths[-1], dropout)
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.down:
            h = level(h)  # (B, ch*ch_mult[i], H/2**(i+1), W/2**(i+1)), no halving after the last level
        h = self.mid(h)  # (B, ch*ch_mult[-1], H/f, W/f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 2*z_channels, H/f, W/f)


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_ch, f h, f w); ``give_pre_end`` returns the last features.

    Takes the whole CompVis ``ddconfig``; ``in_channels`` and ``double_z`` belong to the encoder.
    """

    def __init__(self, *, ch: int = 128, out_ch: int = 3, ch_mult: Sequence[int] = (1, 2, 4, 4),
                 num_res_blocks: int = 2, attn_resolutions: Sequence[int] = (), dropout: float = 0.0,
                 resamp_with_conv: bool = True, in_channels: int = 3, resolution: int = 256,
                 z_channels: int = 4, double_z: bool = True, give_pre_end: bool = False, tanh_out: bool = False):
        super().__init__()
        widths = [ch * m for m in ch_mult]
        in_widths = widths[1:] + widths[-1:]  # up[i] reads the output of up[i+1]; the coarsest reads mid
        self.give_pre_end = give_pre_end
        self.tanh_out = tanh_out
        self.conv_in = nn.Conv2d(z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1], dropout)
        self.up = nn.ModuleList(
            UpLevel(in_widths[i], widths[i], num_res_blocks + 1, res in tuple(attn_resolutions), dropout,
                    upsample=i != 0, resamp_with_conv=resamp_with_conv)
            for i, res in enumerate(decoder_resolutions(resolution, len(widths)))
        )
        self.norm_out = group_norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # (B, ch*ch_mult[-1], h, w)
        for level in reversed(self.up):
            h = level(h)  # (B, ch*ch_mult[i], 2x the size, except after level 0)
        if self.give_pre_end:
            return h
        h = self.conv_out(F.silu(self.norm_out(h)))  # (B, out_ch, f h, f w)
        return torch.tanh(h) if self.tanh_out else h


def encoder_resolutions(resolution: int, num_levels: int) -> list[int]:
    """Nominal resolution of each encoder level: ``resolution`` halved (floor) once per level."""
    return [resolution // 2**i for i in range(num_levels)]


def decoder_resolutions(resolution: int, num_levels: int) -> list[int]:
    """Nominal resolution of decoder level i: the coarsest encoder resolution doubled back up, as CompVis."""
    coarsest = resolution // 2 ** (num_levels - 1)
    return [coarsest * 2 ** (num_levels - 1 - i) for i in range(num_levels)]
