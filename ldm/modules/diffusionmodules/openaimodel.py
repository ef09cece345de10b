"""The sd-v1 denoising UNet eps_theta(x_t, t, c) in the CompVis layout.

ADM UNet (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs", sec. 3) with the cross-attention
SpatialTransformers of latent diffusion (Rombach et al. 2022, sec. 3.3). Module names follow CompVis
`openaimodel.py`, so sd-v1 checkpoints load strictly under `model.diffusion_model.`.
"""
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ldm import compat
from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.util import checkpoint, normalization, timestep_embedding, zero_module


class ResBlock(nn.Module):
    """h = Conv(SiLU(GN x)) + Linear(SiLU emb); out = skip(x) + Conv(Dropout(SiLU(GN h)))."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float = 0.0,
        out_channels: Optional[int] = None,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        out_channels = channels if out_channels is None else out_channels
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )
        self.use_checkpoint = use_checkpoint

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, x, emb, enabled=self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)  # [B, C_out, H, W]
        h = h + rearrange(self.emb_layers(emb), "b c -> b c 1 1")  # [B, C_out, H, W]
        return self.skip_connection(x) + self.out_layers(h)  # [B, C_out, H, W]


class Downsample(nn.Module):
    """Stride-2 3x3 convolution: [B, C, H, W] -> [B, C, H/2, W/2]."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)  # [B, C, H/2, W/2]


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling, then a 3x3 convolution: [B, C, H, W] -> [B, C, 2H, 2W]."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))  # [B, C, 2H, 2W]


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands the time embedding to ResBlocks and the context to transformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: Optional[torch.Tensor] = None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


CHANNEL_MULT = (1, 2, 4, 8)  # UNetModel's default (sd-v1's)


def size_multiple(channel_mult: Sequence[int]) -> int:
    """What a latent side must be a multiple of: each level after the first halves it."""
    return 2 ** (len(channel_mult) - 1)


def head_split(channels: int, num_heads: int, num_head_channels: int, legacy: bool) -> tuple[int, int]:
    """(heads, head width) of a SpatialTransformer on `channels`, by the CompVis rule.

    A fixed head width (num_head_channels != -1) overrides num_heads; with legacy the width is
    channels // heads again (differs only when num_head_channels does not divide channels).
    """
    if num_head_channels == -1:
        return num_heads, channels // num_heads
    heads = channels // num_head_channels
    return heads, channels // heads if legacy else num_head_channels


@dataclass(frozen=True)
class _BlockFactory:
    """Builds ResBlocks and SpatialTransformers with the options shared across the UNet."""

    emb_channels: int
    dropout: float
    num_heads: int
    num_head_channels: int
    legacy: bool
    transformer_depth: int
    context_dim: int
    use_checkpoint: bool

    def res(self, channels: int, out_channels: int) -> ResBlock:
        return ResBlock(channels, self.emb_channels, self.dropout, out_channels, self.use_checkpoint)

    def attn(self, channels: int) -> SpatialTransformer:
        """CompVis gives the transformers no dropout."""
        heads, d_head = head_split(channels, self.num_heads, self.num_head_channels, self.legacy)
        return SpatialTransformer(
            channels, heads, d_head, self.transformer_depth, 0.0, self.context_dim, self.use_checkpoint
        )


def _input_blocks(
    f: _BlockFactory, in_channels: int, mc: int, mults: Sequence[int], n_res: int, attn_res: Sequence[int]
) -> tuple[nn.ModuleList, list[int]]:
    """Encoder: stem conv, then per level n_res ResBlocks (+ attention) and a Downsample."""
    blocks = [TimestepEmbedSequential(nn.Conv2d(in_channels, mc, 3, padding=1))]
    chans, ch, ds = [mc], mc, 1
    for level, mult in enumerate(mults):
        for _ in range(n_res):
            layers = [f.res(ch, mult * mc)]
            ch = mult * mc
            if ds in attn_res:
                layers.append(f.attn(ch))
            blocks.append(TimestepEmbedSequential(*layers))
            chans.append(ch)
        if level != len(mults) - 1:
            blocks.append(TimestepEmbedSequential(Downsample(ch)))
            chans.append(ch)
            ds *= 2
    return nn.ModuleList(blocks), chans


def _output_blocks(
    f: _BlockFactory, mc: int, mults: Sequence[int], n_res: int, attn_res: Sequence[int], skips: list[int]
) -> nn.ModuleList:
    """Decoder: per level n_res + 1 ResBlocks on [h, skip] (+ attention) and an Upsample."""
    skips = list(skips)
    blocks, ch, ds = [], skips[-1], 2 ** (len(mults) - 1)
    for level, mult in reversed(list(enumerate(mults))):
        for i in range(n_res + 1):
            layers = [f.res(ch + skips.pop(), mult * mc)]
            ch = mult * mc
            if ds in attn_res:
                layers.append(f.attn(ch))
            if level and i == n_res:
                layers.append(Upsample(ch))
                ds //= 2
            blocks.append(TimestepEmbedSequential(*layers))
    return nn.ModuleList(blocks)


class UNetModel(nn.Module):
    """eps_theta(x_t, t, c): the sd-v1 UNet, CompVis checkpoint keys.

    2-D, spatial transformers with cross-attention, num_heads / num_head_channels and both `legacy`
    head rules, dropout, gradient checkpointing. CompVis configs build through `from_config_params`
    (`ldm.compat`): it drops `image_size`, `num_heads_upsample` and `use_new_attention_order` (no
    effect on a spatial-transformer UNet, as in CompVis) and raises ValueError for the options of
    other CompVis models (num_classes, n_embed, dims != 2, use_fp16 -- cast the module instead --,
    use_scale_shift_norm, resblock_updown, conv_resample=False, use_spatial_transformer=False).
    """

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = CHANNEL_MULT,
        use_checkpoint: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        transformer_depth: int = 1,
        context_dim: Optional[int] = None,
        legacy: bool = True,
    ):
        super().__init__()
        if not isinstance(context_dim, int):
            raise ValueError(f"UNetModel: context_dim must be an int (sd-v1: 768), got {context_dim!r}")
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("UNetModel: set num_heads or num_head_channels (sd-v1: num_heads=8)")
        self.in_channels, self.out_channels, self.model_channels = in_channels, out_channels, model_channels
        emb_channels = 4 * model_channels
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels)
        )
        f = _BlockFactory(
            emb_channels=emb_channels,
            dropout=dropout,
            num_heads=num_heads,
            num_head_channels=num_head_channels,
            legacy=legacy,
            transformer_depth=transformer_depth,
            context_dim=context_dim,
            use_checkpoint=use_checkpoint,
        )
        mults, attn_res = tuple(channel_mult), tuple(attention_resolutions)
        self.size_multiple = size_multiple(mults)
        self.input_blocks, skips = _input_blocks(
            f, in_channels, model_channels, mults, num_res_blocks, attn_res
        )
        ch = skips[-1]
        self.middle_block = TimestepEmbedSequential(f.res(ch, ch), f.attn(ch), f.res(ch, ch))
        self.output_blocks = _output_blocks(f, model_channels, mults, num_res_blocks, attn_res, skips)
        ch = mults[0] * model_channels
        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(nn.Conv2d(ch, out_channels, 3, padding=1))
        )

    @classmethod
    def from_config_params(cls, **params: Any) -> "UNetModel":
        """Build from CompVis config parameters (`ldm.compat`)."""
        return cls(**compat.adapt("UNetModel", params))

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Predict eps for x_t [B, C_in, H, W] at timesteps [B] (int or float) given context [B, L, D].

        Returns eps [B, C_out, H, W] in x's dtype.
        """
        t_emb = timestep_embedding(timesteps, self.model_channels).to(x.dtype)  # [B, mc]
        emb = self.time_embed(t_emb)  # [B, 4 mc]
        h, skips = x, []
        for block in self.input_blocks:
            h = block(h, emb, context)  # [B, C_i, H_i, W_i]
            skips.append(h)
        h = self.middle_block(h, emb, context)  # [B, C_mid, H_min, W_min]
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)  # [B, C_i, H_i, W_i]
        return self.out(h)  # [B, C_out, H, W]
