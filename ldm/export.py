"""Slim inference checkpoints from training checkpoints (k-diffusion's ``convert_for_inference`` idea).

Input: a Lightning training checkpoint (``last.ckpt``: ``state_dict`` plus optimizer, loops, ...;
a lean one is completed from the base file it refers to, ``core.lean``) or any sd-v1 file. Output: the sd-v1 layout only, ``model.diffusion_model.*``, ``first_stage_model.*``,
``cond_stage_model.transformer.text_model.*`` and the schedule buffers:

1. the keys are checked against that layout (one error line naming the odd keys, in
   ``core.weights.raise_mismatch``'s format);
2. with EMA, each UNet tensor is replaced by its EMA copy ``model_ema.<name without dots>``;
3. ``model_ema.*``, everything that is not a weight (optimizer, counters, RNG states) and the CLIP
   ``position_ids`` buffer of older files (always 0..76; newer transformers refuse it) are dropped;
4. the network weights are cast to the asked dtype; the schedule buffers stay float32 (they are
   tiny, and float16 would round alphas_cumprod, changing every sample);
5. the file is written atomically, ``.safetensors`` or ``.ckpt`` by its suffix.

A diffusers-format folder can be written too, through diffusers' own single-file converters (an
optional dependency, imported only then).
"""
from __future__ import annotations

import inspect
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

from core.weights import SAFETENSORS_SUFFIXES, CheckpointError, load_checkpoint, raise_mismatch, save_checkpoint
from core.config import DTYPES
from core.lean import restore_state
from ldm.models.diffusion.ddpm import EMA_PREFIX
from ldm.models.diffusion.schedule import make_beta_schedule, schedule_buffers

UNET_PREFIX = "model.diffusion_model."
NETWORK_PREFIXES = (UNET_PREFIX, "first_stage_model.", "cond_stage_model.")
SCHEDULE_KEYS = frozenset(schedule_buffers(make_beta_schedule("linear", 2))) | {"scale_factor"}
CKPT_SUFFIXES = (".ckpt", ".pt", ".pth")
POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def ema_key(key: str) -> str:
    """``model.diffusion_model.a.0.b`` -> ``model_ema.diffusion_modela0b`` (CompVis LitEma names)."""
    return EMA_PREFIX + key.removeprefix("model.").replace(".", "")


def has_ema(state: Mapping[str, Any]) -> bool:
    return any(k.startswith(EMA_PREFIX) for k in state)


def check_sd_v1(state: Mapping[str, Any], source: str) -> None:
    """Every part of sd-v1 present, nothing else but schedule buffers and EMA."""
    absent = [p + "*" for p in NETWORK_PREFIXES if not any(k.startswith(p) for k in state)]
    if absent:
        raise CheckpointError(f"{source}: not an sd-v1 checkpoint: no {', '.join(absent)} keys")
    odd = [k for k in state if not (k.startswith(NETWORK_PREFIXES + (EMA_PREFIX,)) or k in SCHEDULE_KEYS)]
    raise_mismatch(source, "sd-v1", [], sorted(odd))
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{source}: expected tensors, but key {not_tensors[0]!r} is not one")


def with_ema_weights(state: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The UNet tensors replaced by their EMA copies."""
    unet = [k for k in state if k.startswith(UNET_PREFIX)]
    absent = [k for k in unet if ema_key(k) not in state]
    if absent:
        raise CheckpointError(f"{source}: the EMA has no copy of {len(absent)} UNet tensors, e.g. {absent[0]} "
                              f"(expected {ema_key(absent[0])})")
    return {**state, **{k: state[ema_key(k)] for k in unet}}


def _cast(key: str, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if key.startswith(NETWORK_PREFIXES) and value.is_floating_point():
        return value.to(dtype)
    return value


def inference_state_dict(state: Mapping[str, Any], source: str, ema: bool | None = None,
                         dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Steps 1-4 of the module notes. ``ema`` None: the EMA weights when the checkpoint has them."""
    check_sd_v1(state, source)
    use_ema = has_ema(state) if ema is None else ema
    if use_ema and not has_ema(state):
        raise CheckpointError(f"{source}: EMA weights asked for, but the checkpoint has no model_ema.* keys "
                              "(export with --no-ema)")
    weights = with_ema_weights(state, source) if use_ema else dict(state)
    return {k: _cast(k, v, dtype) for k, v in weights.items() if not k.startswith(EMA_PREFIX) and k != POSITION_IDS}


def read_training_checkpoint(path: str | os.PathLike,
                             base: str | os.PathLike | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """(weights, facts for the metadata) of a Lightning checkpoint or an sd-v1 file (``base``: a lean
    checkpoint's base file, when it was moved from the recorded path)."""
    ckpt = load_checkpoint(path)
    facts = {"source": Path(path).name}
    for key in ("global_step", "epoch"):
        if isinstance(ckpt.get(key), int):
            facts[key] = str(ckpt[key])
    return restore_state(ckpt, str(path), base), facts


def save_inference_checkpoint(state: Mapping[str, torch.Tensor], path: str | os.PathLike,
                              metadata: Mapping[str, str]) -> Path:
    """Atomic write: ``.safetensors`` (metadata in its header) or a torch ``.ckpt`` ``{"state_dict", "export"}``."""
    path = Path(path)
    if path.suffix in SAFETENSORS_SUFFIXES:
        return save_checkpoint(state, path, metadata={"format": "pt", **metadata})
    if path.suffix in CKPT_SUFFIXES:
        return save_checkpoint({"state_dict": dict(state), "export": dict(metadata)}, path)
    raise ValueError(f"{path}: the output must end in .safetensors or {', '.join(CKPT_SUFFIXES)}")


def export(src: str | os.PathLike, dst: str | os.PathLike, ema: bool | None = None,
           dtype: str = "fp32", base: str | os.PathLike | None = None) -> tuple[Path, dict[str, torch.Tensor]]:
    """Read ``src`` (a lean one completed from ``base`` or its recorded base file), write the slim
    checkpoint ``dst``; returns its path and weights."""
    check_dtype(dtype)
    weights, facts = read_training_checkpoint(src, base)
    return export_weights(weights, str(src), dst, facts, ema, dtype)


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")


def export_weights(weights: Mapping[str, Any], source: str, dst: str | os.PathLike, facts: Mapping[str, str],
                   ema: bool | None = None, dtype: str = "fp32") -> tuple[Path, dict[str, torch.Tensor]]:
    """Steps 1-5 for weights in memory (``source`` names them in errors); ``facts`` go to the metadata."""
    use_ema = has_ema(weights) if ema is None else ema
    state = inference_state_dict(weights, source, use_ema, DTYPES[dtype])
    return save_inference_checkpoint(state, dst, {**facts, "ema": str(use_ema).lower(), "dtype": dtype}), state


# ---- diffusers ------------------------------------------------------------------------------------
def text_encoder_params(config: Mapping[str, Any]) -> dict[str, Any]:
    """The text encoder's constructor arguments: the config's, then ``FrozenCLIPEmbedder``'s defaults."""
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder

    defaults = {k: p.default for k, p in inspect.signature(FrozenCLIPEmbedder).parameters.items()}
    return {**defaults, **(config["model"]["params"]["cond_stage_config"].get("params") or {})}


def hf_clip_tokenizer(max_length: int) -> Any:
    """transformers' ``CLIPTokenizer`` with the vocabulary of ours (the same BPE merge list)."""
    from transformers import CLIPTokenizer

    from ldm.modules.encoders.tokenizer import BOS, EOS, build_vocab, read_merges

    merges = read_merges()
    names = {BOS: "<|startoftext|>", EOS: "<|endoftext|>"}
    vocab = {names.get(token, token): i for token, i in build_vocab(merges).items()}
    return CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=max_length)


def diffusers_text_encoder(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> Any:
    """transformers' ``CLIPTextModel`` through diffusers' ``convert_ldm_clip_checkpoint``, strictly."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.modules.encoders.tokenizer import CLIPTokenizer

    p = text_encoder_params(config)
    ours = CLIPTokenizer(context_length=p["max_length"])
    text_config = CLIPTextConfig(vocab_size=p["vocab_size"], hidden_size=p["width"],
                                 intermediate_size=p["width"] * p["mlp_ratio"], num_hidden_layers=p["layers"],
                                 num_attention_heads=p["heads"], max_position_embeddings=p["max_length"],
                                 hidden_act=p["act"], bos_token_id=ours.bos_id, eos_token_id=ours.eos_id,
                                 pad_token_id=ours.eos_id)
    model = CLIPTextModel(text_config)
    converted = convert_ldm_clip_checkpoint(dict(state))
    if not any(k.startswith("text_model.") for k in model.state_dict()):  # transformers >= 5 drops the prefix
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    model.load_state_dict(converted, strict=True)
    return model


def scaling_factor(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> float | None:
    """The VAE latent scale: the weights' ``scale_factor`` buffer (``scale_by_std`` measured it) when
    present, else the config's ``scale_factor`` (None: diffusers' sd-v1 default)."""
    if "scale_factor" in state:
        return float(state["scale_factor"])
    return config["model"]["params"].get("scale_factor")


def diffusers_pipeline(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> Any:
    """A ``StableDiffusionPipeline`` holding these weights (DDIM scheduler of the sd-v1 schedule)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    state = dict(state)
    unet_config = sfu.create_unet_diffusers_config_from_ldm(config, state)
    unet = UNet2DConditionModel(**unet_config)
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(state, unet_config), strict=True)
    vae_config = sfu.create_vae_diffusers_config_from_ldm(config, state,
                                                          scaling_factor=scaling_factor(state, config))
    vae = AutoencoderKL(**vae_config)
    vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(state, vae_config), strict=True)
    params = config["model"]["params"]
    scheduler = DDIMScheduler(num_train_timesteps=params.get("timesteps", 1000), beta_start=params["linear_start"],
                              beta_end=params["linear_end"], beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    text_encoder = diffusers_text_encoder(state, config)
    tokenizer = hf_clip_tokenizer(text_encoder_params(config)["max_length"])
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def check_new_folder(folder: str | os.PathLike) -> Path:
    """A folder to create: absent or empty, in a folder that exists and is writable."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ValueError(f"{folder}: the diffusers folder exists and is not empty")
    parent = folder.absolute().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{folder}: cannot create the diffusers folder there ({parent} is not a writable folder)")
    return folder


def save_diffusers(state: Mapping[str, torch.Tensor], config: Mapping[str, Any], folder: str | os.PathLike,
                   dtype: str = "fp32") -> Path:
    """Write a diffusers-format folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
    ``tokenizer/``, ``scheduler/``), built in a temporary sibling folder and renamed into place."""
    folder = check_new_folder(folder)
    pipe = diffusers_pipeline(state, config)
    if dtype != "fp32":
        pipe = pipe.to(DTYPES[dtype])
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if folder.exists():
            folder.rmdir()
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
