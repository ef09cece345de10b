"""Lean training checkpoints: the weights that change, and a reference to the base file for the rest.

A system fine-tuned from a base weight file (DreamBooth from sd-v1) or folder (BLIP-2 from a Hugging
Face folder) keeps much of it frozen: the VAE, the text encoder when it is not trained, the UNet under
LoRA adapters; BLIP-2's ViT and OPT. Its checkpoints leave those tensors out of ``state_dict`` and say
where they are, under ``base_weights``:

    {"path": the base file or folder (absolute), "sha256": its content (a folder: its files' names
     and hashes), "size": its bytes, "keys": the state-dict keys left out, each the base's tensor of
     that key (in the system's own names: each system completes its checkpoints from its base)}

1. Frozen: a parameter with ``requires_grad`` False (the EMA shadows trainable parameters only, so
   no frozen tensor is EMA'd). Buffers are always kept: the schedule, ``scale_factor``, the EMA.
2. Every reader of a checkpoint (resume, export, ``load_model``) completes it with ``restore_state``:
   the file at ``path`` must still hold the recorded ``sha256``; a moved or changed base is one
   ``CheckpointError`` line. A base may itself be a lean checkpoint (it is completed the same way).
   A system that is built from its base folder (BLIP-2's, from a Hugging Face folder) completes a
   resumed checkpoint from its own frozen weights instead, once the folder is checked
   (``restore_from_module``).
   A base that was moved is given by its new place (``base``: ``--base_weights`` of the scripts, the
   ``--actual_resume`` file on resume); the content is what counts, so it must hold the same sha256.
3. The hash of a file is computed once per process and cached by (path, size, mtime).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from core.weights import CheckpointError, load_checkpoint, raise_mismatch, weights_of

BASE_KEY = "base_weights"
_CHUNK = 1 << 24
_hashes: dict[tuple[str, int, int], str] = {}


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of the file's bytes, cached by (resolved path, size, mtime). A folder (a Hugging Face
    model folder) hashes its files' names and hashes, in name order."""
    path = Path(path).resolve()
    if path.is_dir():
        digest = hashlib.sha256()
        for name, file in _folder_files(path):
            digest.update(f"{name}\0{file_sha256(file)}\n".encode())
        return digest.hexdigest()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _hashes:
        _hashes[key] = _hash_file(path)
    return _hashes[key]


def _folder_files(folder: Path) -> list[tuple[str, Path]]:
    """The regular files under ``folder`` (hidden ones skipped), by relative name."""
    files = [p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".")
                                                                    for part in p.relative_to(folder).parts)]
    return sorted((p.relative_to(folder).as_posix(), p) for p in files)


def content_size(path: Path) -> int:
    """Bytes of a file, or of a folder's files."""
    return sum(f.stat().st_size for _, f in _folder_files(path)) if path.is_dir() else path.stat().st_size


def frozen_keys(module: nn.Module, keep: tuple[str, ...] = ()) -> list[str]:
    """State-dict keys of the frozen parameters of ``module``, but those starting with a ``keep`` prefix."""
    return [name for name, p in module.named_parameters(remove_duplicate=False)
            if not p.requires_grad and not (keep and name.startswith(keep))]


def base_reference(path: str | os.PathLike, keys: Iterable[str]) -> dict[str, Any]:
    """The ``base_weights`` entry of a checkpoint whose ``keys`` are those of the file at ``path``."""
    path = Path(path).resolve()
    return {"path": str(path), "sha256": file_sha256(path), "size": content_size(path), "keys": list(keys)}


def make_lean(checkpoint: dict[str, Any], module: nn.Module, base: str | os.PathLike,
              keep: tuple[str, ...] = ()) -> None:
    """Leave ``module``'s frozen parameters out of ``checkpoint["state_dict"]`` and reference ``base``,
    the file they were loaded from (``keep``: prefixes of frozen parameters that did not come from it)."""
    keys = frozen_keys(module, keep)
    if not keys:
        return
    left_out = set(keys)
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in left_out}
    checkpoint[BASE_KEY] = base_reference(base, keys)


def check_base(reference: Mapping[str, Any], source: str, base: str | os.PathLike | None = None) -> Path:
    """The base file of ``reference`` (or ``base``, its new place), when it is there and holds the recorded
    content; else one ``CheckpointError`` line."""
    if base is not None and Path(base).resolve() == Path(reference["path"]):
        base = None  # the recorded place itself
    path = Path(reference["path"] if base is None else base)
    if not path.exists():
        if base is not None:
            raise CheckpointError(f"{source}: the base weights given, {path}, are not there")
        raise CheckpointError(f"{source}: its base weights {path} are not there (moved or deleted?); the checkpoint "
                              f"holds only the trained weights and needs that file (sha256 {reference['sha256']}): "
                              "give its new place with --base_weights FILE (on resume: --actual_resume FILE)")
    found = file_sha256(path)
    if found != reference["sha256"]:
        what = "have changed" if base is None else "are not those it was trained from"
        raise CheckpointError(f"{source}: its base weights {path} {what} (sha256 {found}, trained from "
                              f"{reference['sha256']}): refused, the frozen weights would not be those it was trained with")
    return path


def restore_state(checkpoint: Mapping[str, Any], source: str,
                  base: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """The complete weights of a read checkpoint: its own, and a lean one's left-out keys from its base
    (``base``: where that file is now, when it was moved; None: the recorded path)."""
    state = weights_of(checkpoint, source)
    reference = checkpoint.get(BASE_KEY)
    if reference is None:
        if base is not None:
            raise CheckpointError(f"{source}: --base_weights {base} given, but the checkpoint is complete "
                                  "(it refers to no base file)")
        return state
    path = check_base(reference, source, base)
    base = full_state_dict(path)
    raise_mismatch(str(path), f"the base weights of {source}", [k for k in reference["keys"] if k not in base], [])
    return {**{k: base[k] for k in reference["keys"]}, **state}


def full_state_dict(path: str | os.PathLike, base: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """``core.weights.load_state_dict`` of ``path``, completed by ``restore_state`` when it is lean
    (``base``: the base file's new place)."""
    return restore_state(load_checkpoint(path), str(path), base)


def restore_from_module(checkpoint: dict[str, Any], module: nn.Module, base: str | os.PathLike | None,
                        source: str, how: str) -> None:
    """On resume into ``module``, built from the base file or folder ``base`` (None: built from none):
    a lean ``checkpoint``'s left-out weights are the module's own, once ``base`` is checked to hold the
    recorded content (``how``: the setting that gives the base, for the error line)."""
    reference = checkpoint.get(BASE_KEY)
    if reference is None:
        return
    if base is None:
        raise CheckpointError(f"{source}: a lean checkpoint of a run from {reference['path']}; build the model "
                              f"from that base ({how})")
    check_base(reference, source, base)
    own = module.state_dict()
    checkpoint["state_dict"] = {**{k: own[k] for k in reference["keys"]}, **checkpoint["state_dict"]}
