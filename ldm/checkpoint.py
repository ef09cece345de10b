"""Checkpoint reading and writing: the one place that touches weight files.

Reading never unpickles code: ``.ckpt`` files go through ``torch.load(weights_only=True)``
with a short allow-list of inert names that the released sd-v1 Lightning checkpoints carry
(the ``ModelCheckpoint`` class used as a dict key, numpy scalars of callback scores).
Writing is atomic: a temporary file in the same folder, fsync, then ``os.replace``.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch

SAFETENSORS_SUFFIXES = (".safetensors",)


class CheckpointError(ValueError):
    """A weight file that is missing, unreadable or of the wrong shape; the message names it."""


class _InertLightningCallback:
    """Stands in for ``pytorch_lightning``'s ``ModelCheckpoint`` class, used only as a dict key."""


def _allowed_globals() -> list:
    allowed: list = [
        (_InertLightningCallback, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
        (_InertLightningCallback, "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint"),
        np.dtype,
    ]
    scalar = np._core.multiarray.scalar
    allowed += [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")]
    allowed += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32")]
    return allowed


def _torch_load(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f"it references {found.group(1)}" if found else "it is not a plain weights pickle"
        raise CheckpointError(
            f"{path}: refused to load: {what}, which could run code; only tensors and plain data are "
            "read from .ckpt files (convert it to .safetensors or re-save its state_dict)"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({err})") from None


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a whole checkpoint file: a dict (a ``.safetensors`` file gives its tensors)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if path.suffix in SAFETENSORS_SUFFIXES:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: not a readable .safetensors file ({err})") from None
    obj = _torch_load(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors or a dict with 'state_dict', got {type(obj).__name__}")
    return dict(obj)


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read the weights of a checkpoint: its ``state_dict`` entry when there is one, else the file."""
    ckpt = load_checkpoint(path)
    state = ckpt.get("state_dict", ckpt)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: expected tensors, but key {bad[0]!r} holds {type(state[bad[0]]).__name__}")
    return dict(state)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode(path))  # mkstemp made it 0600; give what a plain open() would
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _file_mode(path: Path) -> int:
    """The existing file's mode, else 0666 less the process umask."""
    if path.exists():
        return path.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def save_checkpoint(obj: Mapping[str, Any], path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``obj`` atomically: ``.safetensors`` (a flat dict of tensors) or a torch pickle."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix in SAFETENSORS_SUFFIXES:
            from safetensors.torch import save_file

            tensors = {k: v.detach().contiguous() for k, v in obj.items()}
            save_file(tensors, str(tmp), metadata=dict(metadata or {}))
        else:
            torch.save(dict(obj), tmp)
    return path


def load_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str,
                optional: tuple[str, ...] = ()) -> None:
    """``module.load_state_dict(state)`` with every key and shape checked; a mismatch is one
    ``CheckpointError`` line naming ``source`` and some keys. Keys of ``module`` that start with a
    prefix in ``optional`` may be absent (they keep their current values)."""
    expected = module.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (expected {tuple(expected[k].shape)})" for k, v in state.items()
             if k in expected and v.shape != expected[k].shape]
    if wrong:
        raise CheckpointError(f"{source}: {len(wrong)} tensors have the wrong shape for this config, e.g. "
                              + "; ".join(wrong[:3]))
    result = module.load_state_dict(dict(state), strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(optional)] if optional else result.missing_keys
    if missing or result.unexpected_keys:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys, e.g. {', '.join(missing[:4])}")
        if result.unexpected_keys:
            parts.append(f"{len(result.unexpected_keys)} unexpected keys, e.g. {', '.join(result.unexpected_keys[:4])}")
        raise CheckpointError(f"{source}: checkpoint does not fit {type(module).__name__}: " + "; ".join(parts))
