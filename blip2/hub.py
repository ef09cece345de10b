"""Reading a Hugging Face Hub folder of BLIP-2 OPT (``Salesforce/blip2-opt-2.7b`` and alike).

``config.json`` (transformers' ``Blip2Config`` fields), ``model.safetensors`` or shards listed in
``model.safetensors.index.json`` (else ``pytorch_model.bin`` or its shards, ``core.weights``), the
tokenizer files (GPT-2 BPE, loaded offline with ``AutoTokenizer``), ``preprocessor_config.json``
(image size, mean, std) and ``generation_config.json`` (the model's ``generation_defaults``: an
option given to ``generate`` still wins). Weights must match
transformers' ``Blip2ForConditionalGeneration`` keys exactly; the tied output head
``language_model.lm_head.weight`` may be absent (transformers does not save tied copies), and when
present it must equal the token embedding. Tensors are read one at a time into their final dtype
and device, into a model built on the meta device.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch

from blip2.config import defaulted_sizes
from blip2.generation import GenerationSettings, supported_fields
from blip2.processors import CLIP_MEAN, CLIP_STD, PREPROCESSOR_FILE, processor_args
from core.cli import first_line
from core.weights import CheckpointError, check_keys, open_folder, read_json, wrong_shape

LAYOUT = "Blip2ForConditionalGeneration"
TIED = ("language_model.lm_head.weight", "language_model.model.decoder.embed_tokens.weight")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")
GENERATION_FILE = "generation_config.json"


def check_tied_keys(where: str, found: set[str], expected: set[str]) -> None:
    """Strict key match (``core.weights.check_keys``), allowing one of the tied head and embedding to be absent."""
    head, embed = TIED
    present = found | ({head} if embed in found else set()) | ({embed} if head in found else set())
    check_keys(where, LAYOUT, found, expected - (present - found))


def assign_weights(model: torch.nn.Module, source: str, keys: set[str], get: Callable[[str], torch.Tensor],
                   device: str | torch.device) -> torch.nn.Module:
    """Load the tensors ``get(key)`` for ``keys`` strictly into ``model`` (built on the meta device,
    in its final precision): each is cast to its parameter's dtype on ``device``. Errors name ``source``."""
    targets = model.state_dict()
    check_tied_keys(source, keys, set(targets))
    weights = {}
    for key in sorted(keys):
        tensor = get(key)
        if tensor.shape != targets[key].shape:
            check_keys(source, LAYOUT, keys, keys, wrong=[wrong_shape(key, tensor.shape, targets[key].shape)])
        weights[key] = tensor.to(device=device, dtype=targets[key].dtype, copy=True)  # never the file's mmap
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
    source, readers = open_folder(folder)
    return assign_weights(model, source, set(readers), lambda key: readers[key](), device)


def load_tokenizer(folder: Path) -> Any:
    """The folder's tokenizer (offline), or ``None`` when it has no tokenizer files."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{folder}: cannot load the tokenizer ({first_line(err)})") from None


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


def generation_defaults(folder: Path) -> dict[str, Any]:
    """The decoding settings of ``generation_config.json`` ({} when absent), checked now: an option
    that ``blip2.generation`` does not support, or a bad value, is an error naming the file."""
    path = folder / GENERATION_FILE
    if not path.is_file():
        return {}
    try:
        values = supported_fields(read_json(path), str(path))
        GenerationSettings.build(None, values)
    except (TypeError, ValueError) as err:
        raise CheckpointError(first_line(err) if str(path) in str(err) else f"{path}: {first_line(err)}") from None
    return values


def load_pretrained(cls: type, folder: str | os.PathLike, dtype: torch.dtype, device: str | torch.device):
    """Build ``cls`` (``Blip2OPT``) from a Hub folder: see the module docstring. On the meta device
    the weights are not read: the folder's architecture, tokenizer and image settings alone."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder")
    config = read_json(folder / "config.json")
    tokenizer = load_tokenizer(folder)
    model = cls.from_config(config, dtype=dtype, device="meta", tokenizer=tokenizer)
    for name, value in image_settings(folder, model.image_size).items():
        setattr(model, name, value)
    model.generation_defaults = generation_defaults(folder)
    if torch.device(device).type == "meta":
        return model.eval()
    try:
        return load_safetensors(model, folder, device).eval()
    except CheckpointError as err:
        unset = defaulted_sizes(config)
        if "wrong shapes" not in str(err) or not unset:
            raise
        raise CheckpointError(f"{first_line(err)}; {folder / 'config.json'} leaves sizes to transformers' defaults: "
                              f"{', '.join(unset[:4])}{' ...' if len(unset) > 4 else ''}") from None
