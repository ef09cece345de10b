"""Reading a Hugging Face Hub folder of BLIP-2 OPT (``Salesforce/blip2-opt-2.7b`` and alike).

``config.json`` (transformers' ``Blip2Config`` fields), ``model.safetensors`` or shards listed in
``model.safetensors.index.json``, the tokenizer files (GPT-2 BPE, loaded offline with
``AutoTokenizer``) and ``preprocessor_config.json`` (image size, mean, std). Weights must match
transformers' ``Blip2ForConditionalGeneration`` keys exactly; the tied output head
``language_model.lm_head.weight`` may be absent (transformers does not save tied copies), and when
present it must equal the token embedding. Tensors are read one at a time into their final dtype
and device, into a model built on the meta device.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

from blip2.processors import CLIP_MEAN, CLIP_STD, PREPROCESSOR_FILE, processor_args
from ldm.checkpoint import CheckpointError

INDEX_FILE, SINGLE_FILE = "model.safetensors.index.json", "model.safetensors"
TIED = ("language_model.lm_head.weight", "language_model.model.decoder.embed_tokens.weight")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; a clear one-line error when missing or malformed."""
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def weight_files(folder: Path) -> tuple[Path, list[Path]]:
    """(the file that names the weights, the safetensors files): the index and its shards, or the single file."""
    if (folder / INDEX_FILE).is_file():
        weight_map = read_json(folder / INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{folder / INDEX_FILE}: expected a non-empty 'weight_map' object")
        return folder / INDEX_FILE, [folder / name for name in sorted(set(weight_map.values()))]
    if (folder / SINGLE_FILE).is_file():
        return folder / SINGLE_FILE, [folder / SINGLE_FILE]
    raise CheckpointError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors weights are read)")


def _open(path: Path):
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise CheckpointError(f"{path}: weight shard not found")
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable .safetensors file ({err})") from None


def _key_list(keys: set[str]) -> str:
    shown = sorted(keys)[:5]
    return f"{len(keys)} ({', '.join(shown)}{', ...' if len(keys) > 5 else ''})"


def check_keys(where: str, found: set[str], expected: set[str]) -> None:
    """Strict key match, allowing the tied head to be absent."""
    missing = expected - found - ({TIED[0]} if TIED[1] in found else set())
    if TIED[0] in found and TIED[1] not in found:
        missing.discard(TIED[1])
    unexpected = found - expected
    if missing or unexpected:
        parts = ([f"missing keys {_key_list(missing)}"] if missing else []) + (
            [f"unexpected keys {_key_list(unexpected)}"] if unexpected else [])
        raise CheckpointError(f"{where}: does not match the Blip2ForConditionalGeneration layout: {'; '.join(parts)}")


def assign_weights(model: torch.nn.Module, source: str, keys: set[str], get: Callable[[str], torch.Tensor],
                   device: str | torch.device) -> torch.nn.Module:
    """Load the tensors ``get(key)`` for ``keys`` strictly into ``model`` (built on the meta device,
    in its final precision): each is cast to its parameter's dtype on ``device``. Errors name ``source``."""
    targets = model.state_dict()
    check_keys(source, keys, set(targets))
    weights = {}
    for key in sorted(keys):
        tensor = get(key)
        if tensor.shape != targets[key].shape:
            raise CheckpointError(f"{source}: {key} has shape {tuple(tensor.shape)}, expected {tuple(targets[key].shape)}")
        weights[key] = tensor.to(device=device, dtype=targets[key].dtype)
    model.load_state_dict(_tie(weights, source), strict=True, assign=True)
    model.language_model.tie_weights()
    return model


def _tie(weights: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    head, embed = TIED
    if head in weights and embed in weights and not torch.equal(weights[head], weights[embed]):
        raise CheckpointError(f"{source}: {head} differs from {embed}, but OPT ties them")
    weights.setdefault(embed, weights.get(head))
    weights[head] = weights[embed]
    return weights


def load_safetensors(model: torch.nn.Module, folder: Path, device: str | torch.device) -> torch.nn.Module:
    """``assign_weights`` from the folder's safetensors, one tensor at a time."""
    source, files = weight_files(folder)
    handles = {path: _open(path) for path in files}
    owner = {key: handle for handle in handles.values() for key in handle.keys()}
    return assign_weights(model, str(source), set(owner), lambda key: owner[key].get_tensor(key), device)


def load_tokenizer(folder: Path) -> Any:
    """The folder's tokenizer (offline), or ``None`` when it has no tokenizer files."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{folder}: cannot load the tokenizer ({first})") from None


def image_settings(folder: Path, default_size: int) -> dict[str, Any]:
    """Image size, mean and std from ``preprocessor_config.json`` (CLIP values when absent)."""
    path = folder / PREPROCESSOR_FILE
    if not path.is_file():
        return {"image_size": default_size, "image_mean": CLIP_MEAN, "image_std": CLIP_STD}
    try:
        args = processor_args(read_json(path))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: {err}") from None
    return {"image_size": args["image_size"], "image_mean": tuple(args["mean"]), "image_std": tuple(args["std"])}


def load_pretrained(cls: type, folder: str | os.PathLike, dtype: torch.dtype, device: str | torch.device):
    """Build ``cls`` (``Blip2OPT``) from a Hub folder: see the module docstring."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder")
    config = read_json(folder / "config.json")
    tokenizer = load_tokenizer(folder)
    model = cls.from_config(config, dtype=dtype, device="meta", tokenizer=tokenizer)
    for name, value in image_settings(folder, model.image_size).items():
        setattr(model, name, value)
    return load_safetensors(model, folder, device).eval()
