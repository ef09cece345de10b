"""LoRA adapters (``ldm.modules.lora``) out of our checkpoints, and kohya files into any base model.

An adapted layer ``P`` (a CompVis module path, e.g. ``model.diffusion_model.input_blocks.1.1.
transformer_blocks.0.attn1.to_q``) holds ``P.lora_down.weight`` (r, in[, 1, 1]) and
``P.lora_up.weight`` (out, r[, 1, 1]) next to the base ``P.weight``; alpha comes from the run's
``lora:`` settings. Notation: delta W = (alpha / r) * up @ down.

Formats, each named by the diffusers module path D of P (``diffusers_unet_path``; the text
encoder's paths are transformers' ``CLIPTextModel`` paths, ours already):

1. kohya / A1111 / ComfyUI: ``lora_unet_<D with _>.lora_down.weight``, ``.lora_up.weight``,
   ``.alpha`` (a scalar); ``lora_te_<...>`` for the text encoder;
2. diffusers / peft (``save_lora_weights``): ``unet.<D>.lora_A.weight`` = down,
   ``unet.<D>.lora_B.weight`` = (alpha / r) * up (peft's default lora_alpha = r gives scale 1);
   ``text_encoder.<...>`` for the text encoder;
3. merged: the sd-v1 state with W + delta W in place of W and no adapter keys.
"""
from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from core.weights import CheckpointError, load_state_dict, raise_mismatch, save_checkpoint, wrong_shape
from ldm.modules.lora import is_pointwise_conv

UNET_PREFIX = "model.diffusion_model."
TEXT_PREFIX = "cond_stage_model.transformer."
DOWN, UP = ".lora_down.weight", ".lora_up.weight"
RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
          "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
       "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}


# ---- names ----------------------------------------------------------------------------------------
def _join(prefix: str, rest: list[str]) -> str:
    return ".".join([prefix, *rest])


def _resnet(prefix: str, rest: list[str]) -> str:
    """A ResBlock's inner path (``in_layers.2.weight``) -> diffusers' (``conv1.weight``)."""
    n = 1 if rest[0] == "skip_connection" else 2
    return _join(f"{prefix}.{RESNET['.'.join(rest[:n])]}", rest[n:])


def diffusers_unet_path(path: str, num_res_blocks: int) -> str:
    """A CompVis UNet module or parameter path -> ``UNet2DConditionModel``'s, as diffusers'
    ``convert_ldm_unet_checkpoint`` renames them (sd-v1 layout: ``num_res_blocks`` per level)."""
    for old, new in TOP.items():
        if path == old or path.startswith(old + "."):
            return new + path[len(old):]
    parts = path.split(".")
    if parts[0] == "middle_block":
        position, rest = int(parts[1]), parts[2:]
        return _join("mid_block.attentions.0", rest) if position == 1 else _resnet(
            f"mid_block.resnets.{position // 2}", rest)
    if parts[0] not in ("input_blocks", "output_blocks") or len(parts) < 4:
        raise KeyError(f"{path}: not a path of the sd-v1 UNet")
    index, position, rest = int(parts[1]), int(parts[2]), parts[3:]
    if parts[0] == "input_blocks":
        level, layer = divmod(index - 1, num_res_blocks + 1)
        if layer == num_res_blocks:  # the downsampler ``op``
            return _join(f"down_blocks.{level}.downsamplers.0.conv", rest[1:])
        prefix = f"down_blocks.{level}"
    else:
        level, layer = divmod(index, num_res_blocks + 1)
        if rest[0] == "conv":  # the upsampler, after the ResBlock or after the attention
            return _join(f"up_blocks.{level}.upsamplers.0.conv", rest[1:])
        prefix = f"up_blocks.{level}"
    if position == 0:
        return _resnet(f"{prefix}.resnets.{layer}", rest)
    return _join(f"{prefix}.attentions.{layer}", rest)


def diffusers_path(path: str, num_res_blocks: int) -> tuple[str, str]:
    """Our full module path -> (``"unet"`` or ``"text_encoder"``, the diffusers / transformers path)."""
    if path.startswith(UNET_PREFIX):
        return "unet", diffusers_unet_path(path.removeprefix(UNET_PREFIX), num_res_blocks)
    if path.startswith(TEXT_PREFIX):
        return "text_encoder", path.removeprefix(TEXT_PREFIX)
    raise KeyError(f"{path}: not in the UNet or the text encoder")


def kohya_name(path: str, num_res_blocks: int) -> str:
    part, name = diffusers_path(path, num_res_blocks)
    return {"unet": "lora_unet_", "text_encoder": "lora_te_"}[part] + name.replace(".", "_")


def unet_num_res_blocks(state: Mapping[str, torch.Tensor]) -> int:
    """An sd-v1 UNet has levels * (num_res_blocks + 1) output blocks and levels - 1 downsamplers."""
    blocks = {k.split(".")[3] for k in state if k.startswith(UNET_PREFIX + "output_blocks.")}
    downsamplers = {k.split(".")[3] for k in state if k.startswith(UNET_PREFIX + "input_blocks.") and ".0.op." in k}
    return len(blocks) // (len(downsamplers) + 1) - 1


# ---- from our state -------------------------------------------------------------------------------
def adapters(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Adapted module path -> (down, up), from a state dict of an adapted model."""
    return {k.removesuffix(DOWN): (v, state[k.removesuffix(DOWN) + UP]) for k, v in state.items() if k.endswith(DOWN)}


def has_adapters(state: Mapping[str, torch.Tensor]) -> bool:
    return any(k.endswith(DOWN) for k in state)


def kohya_state_dict(state: Mapping[str, torch.Tensor], alpha: float,
                     num_res_blocks: int | None = None) -> dict[str, torch.Tensor]:
    """Format 1 of the module notes (``num_res_blocks`` None: read from a full ``state``)."""
    out = {}
    num_res_blocks = unet_num_res_blocks(state) if num_res_blocks is None else num_res_blocks
    for path, (down, up) in adapters(state).items():
        name = kohya_name(path, num_res_blocks)
        out |= {name + DOWN: down, name + UP: up, name + ".alpha": torch.tensor(float(alpha))}
    return out


def peft_state_dict(state: Mapping[str, torch.Tensor], alpha: float,
                    num_res_blocks: int | None = None) -> dict[str, torch.Tensor]:
    """Format 2 of the module notes: the scale alpha / r is folded into lora_B."""
    out = {}
    num_res_blocks = unet_num_res_blocks(state) if num_res_blocks is None else num_res_blocks
    for path, (down, up) in adapters(state).items():
        part, name = diffusers_path(path, num_res_blocks)
        out[f"{part}.{name}.lora_A.weight"] = down
        out[f"{part}.{name}.lora_B.weight"] = up * (alpha / down.shape[0])
    return out


def delta_weight(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * up @ down, (out, in[, 1, 1]) as the base weight."""
    delta = scale * up.flatten(1).float() @ down.flatten(1).float()  # (out, in)
    return delta.view(up.shape[0], down.shape[1], *up.shape[2:])


def merged_state_dict(state: Mapping[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """Format 3: every W replaced by W + delta W, the adapter keys dropped (the sd-v1 keys only)."""
    merged = {k: v for k, v in state.items() if not k.endswith((DOWN, UP))}
    for path, (down, up) in adapters(state).items():
        w = merged[path + ".weight"]
        merged[path + ".weight"] = (w.float() + delta_weight(down, up, alpha / down.shape[0])).to(w.dtype)
    return merged


def save_lora(state: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str]) -> Path:
    if Path(path).suffix != ".safetensors":
        raise ValueError(f"{path}: a LoRA file must end in .safetensors")
    return save_checkpoint(state, path, metadata={"format": "pt", **metadata})


# ---- a kohya file into a model --------------------------------------------------------------------
def adaptable_layers(model: nn.Module, num_res_blocks: int) -> dict[str, nn.Module]:
    """kohya name -> layer, for every Linear and 1x1 Conv2d of the UNet and the text encoder."""
    return {kohya_name(n, num_res_blocks): m for n, m in model.named_modules()
            if n.startswith((UNET_PREFIX, TEXT_PREFIX)) and (type(m) is nn.Linear or is_pointwise_conv(m))}


def kohya_groups(state: Mapping[str, torch.Tensor], source: str) -> dict[str, dict[str, torch.Tensor]]:
    """kohya name -> {"down", "up", "alpha"}; any other key is refused."""
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in state.items():
        for suffix, part in ((DOWN, "down"), (UP, "up"), (".alpha", "alpha")):
            if key.endswith(suffix):
                groups[key.removesuffix(suffix)][part] = value
                break
        else:
            raise CheckpointError(f"{source}: key {key!r} is not a kohya LoRA key (lora_down / lora_up / alpha)")
    for name, group in groups.items():
        if "down" not in group or "up" not in group:
            raise CheckpointError(f"{source}: {name} has no {'lora_down' if 'down' not in group else 'lora_up'}")
    return groups


def wrong_shapes(name: str, group: Mapping[str, torch.Tensor], layer: nn.Module) -> list[str]:
    """down (r, in[, 1, 1]) and up (out, r[, 1, 1]) for the layer's weight (out, in[, 1, 1]): the
    ``wrong_shape`` lines of those that do not fit."""
    rank = group["down"].shape[0]
    out_features, in_features, *extra = layer.weight.shape
    expected = {DOWN: (rank, in_features, *extra), UP: (out_features, rank, *extra)}
    return [wrong_shape(name + suffix, tensor.shape, expected[suffix])
            for suffix, tensor in ((DOWN, group["down"]), (UP, group["up"])) if tuple(tensor.shape) != expected[suffix]]


@torch.no_grad()
def merge_kohya(model: nn.Module, path: str | os.PathLike, scale: float = 1.0) -> int:
    """W += scale * (alpha / r) * up @ down for every adapter of the kohya file ``path`` (a file for
    another base, with names or shapes that do not fit, is one line naming it and the key); returns
    the number of layers changed."""
    source = str(path)
    groups = kohya_groups(load_state_dict(path), source)
    layers = adaptable_layers(model, unet_num_res_blocks(model.state_dict()))
    unexpected = [name + DOWN for name in groups if name not in layers]
    wrong = [line for name, group in groups.items() if name in layers for line in wrong_shapes(name, group, layers[name])]
    raise_mismatch(source, "model's LoRA", [], unexpected, wrong)
    for name, group in groups.items():
        rank = group["down"].shape[0]
        alpha = float(group["alpha"]) if "alpha" in group else rank
        weight = layers[name].weight
        weight += delta_weight(group["down"], group["up"], scale * alpha / rank).to(weight)
    return len(groups)


def save_kohya(state: Mapping[str, torch.Tensor], alpha: float, path: str | os.PathLike,
               metadata: Mapping[str, str], dtype: torch.dtype = torch.float32,
               num_res_blocks: int | None = None) -> Path:
    """The adapters of ``state`` as a kohya file in ``dtype`` (with kohya's ``ss_network_*`` facts)."""
    lora = {k: v.to(dtype) for k, v in kohya_state_dict(state, alpha, num_res_blocks).items()}
    rank = next(v.shape[0] for k, v in lora.items() if k.endswith(DOWN))
    return save_lora(lora, path, {"ss_network_dim": str(rank), "ss_network_alpha": str(alpha), **metadata})
