"""Weight files: the one place that reads and writes them, and the one strict key check.

- ``load_checkpoint`` / ``load_state_dict``: a ``.ckpt`` / ``.pth`` pickle or a ``.safetensors`` file;
  ``open_safetensors`` and ``open_folder`` read a Hugging Face folder (one file, or shards with
  their index; ``model.safetensors`` or else transformers' older ``pytorch_model.bin``) one tensor
  at a time (a ``.bin`` shard is memory-mapped).
- ``check_keys``: every strict match of a file against a model (or a layout) raises one
  ``CheckpointError`` line in one format: the file, the layout, then the missing keys, the unexpected
  keys and the tensors of the wrong shape, each as ``count (first keys)``; ``load_strict`` applies it
  to ``module.load_state_dict``.

Reading never unpickles code: ``.ckpt`` files go through ``torch.load(weights_only=True)``
with a short allow-list of inert names that the released sd-v1 Lightning checkpoints carry
(the ``ModelCheckpoint`` class used as a dict key, numpy scalars of callback scores).
Writing is atomic: a temporary file in the same folder, fsync, then ``os.replace``. The temporary is
named after its writer, ``.<name>.<host>-<pid>.<random>.tmp``: one that a killed writer left behind
(same host, a process that no longer exists) is removed by the next write of that name and by
``remove_stale_temporaries`` (the checkpoint callback calls it at train start); those of live
processes (other DDP ranks, another run) and of other hosts are never touched. A write that fails
(a full disk, a file size limit) raises ``WriteError``: one line naming the file and the system's
reason; the file it was to replace is unchanged.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import pickle
import re
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

SAFETENSORS_SUFFIXES = (".safetensors",)
# A Hugging Face folder's weights, in the order looked for: (index of shards, single file).
FOLDER_WEIGHTS = (("model.safetensors.index.json", "model.safetensors"),
                  ("pytorch_model.bin.index.json", "pytorch_model.bin"))


class CheckpointError(ValueError):
    """A weight file that is missing, unreadable or of the wrong shape; the message names it."""


class WriteError(OSError):
    """A file that could not be written (disk full, file size limit, ...); the message names it and the
    reason, and the previous version of the file is kept."""


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


def _torch_load(path: Path, mmap: bool = False) -> Any:
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and _is_zip(path))
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f"it references {found.group(1)}" if found else "it is not a plain weights pickle"
        raise CheckpointError(
            f"{path}: refused to load: {what}, which could run code; only tensors and plain data are "
            "read from .ckpt files (convert it to .safetensors or re-save its state_dict)"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({err})") from None


def _is_zip(path: Path) -> bool:
    """torch.save's zip format (since torch 1.6), which ``torch.load`` can memory-map."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def load_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """Read a whole checkpoint file: a dict (a ``.safetensors`` file gives its tensors). ``mmap``: map
    a torch pickle's tensors from the file instead of reading them (zip-format files)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if path.suffix in SAFETENSORS_SUFFIXES:
        handle = open_safetensors(path)
        return {key: handle.get_tensor(key) for key in handle.keys()}
    obj = _torch_load(path, mmap)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors or a dict with 'state_dict', got {type(obj).__name__}")
    return dict(obj)


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read the weights of a checkpoint: its ``state_dict`` entry when there is one, else the file."""
    return weights_of(load_checkpoint(path), str(path))


def weights_of(ckpt: Mapping[str, Any], source: str) -> dict[str, torch.Tensor]:
    """The weights of a read checkpoint (``source`` names it in errors): ``state_dict``, else all of it."""
    state = ckpt.get("state_dict", ckpt)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source}: 'state_dict' is a {type(state).__name__}, expected a dict of tensors")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: expected tensors, but key {bad[0]!r} holds {type(state[bad[0]]).__name__}")
    return dict(state)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)\.[^./]+\.tmp")


def temporary_prefix(path: Path) -> str:
    """The start of the name of this process's temporaries for ``path`` (see the module notes)."""
    return f".{path.name}.{_host()}-{os.getpid()}."


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def remove_stale_temporaries(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Delete the temporaries in ``folder`` (those for ``name`` only, when given) whose writer was a
    process of this host that no longer exists; returns them."""
    folder, host, removed = Path(folder), _host(), []
    if not folder.is_dir():
        return removed
    with os.scandir(folder) as entries:
        for entry in entries:
            found = _TEMPORARY.fullmatch(entry.name)
            if found is None or found["host"] != host or (name is not None and found["name"] != name):
                continue
            if not _alive(int(found["pid"])):
                Path(entry.path).unlink(missing_ok=True)
                removed.append(Path(entry.path))
    return removed


def os_error_of(err: BaseException) -> OSError | None:
    """The ``OSError`` with an errno behind ``err`` (itself, or its cause / context: torch and PIL wrap
    the write error of the file object they write to)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno is not None:
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def write_error(path: Path, err: OSError) -> WriteError:
    """The one line of a failed write: the file, the system's reason and its errno name."""
    code = errno.errorcode.get(err.errno, str(err.errno))
    error = WriteError(f"{path}: not written: {err.strerror or os.strerror(err.errno)} ({code}); "
                       "any previous version of the file is kept")
    error.errno = err.errno
    return error


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename. The body
    only writes the temporary: an ``OSError`` behind what it raises becomes a ``WriteError``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        try:
            yield tmp
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, _file_mode(path))  # mkstemp made it 0600; give what a plain open() would
            os.replace(tmp, path)
        except Exception as err:
            cause = os_error_of(err)
            if cause is None or isinstance(err, WriteError):
                raise
            raise write_error(path, cause) from None
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
            with open(tmp, "wb") as f:  # through a Python file, so that a write error keeps its errno
                torch.save(dict(obj), f)
    return path


def check_output(path: str | os.PathLike, flag: str, overwrite: bool = False,
                 inputs: Sequence[str | os.PathLike] = ()) -> Path:
    """An output file a script is about to write, checked before any work: never one of its ``inputs``,
    not an existing file unless ``overwrite``, in a folder that exists and is writable (one line
    naming ``flag`` and the path otherwise)."""
    path = Path(path)
    for source in inputs:
        if Path(source).exists() and path.exists() and os.path.samefile(source, path):
            raise ValueError(f"{flag} {path}: is the input file {source}; write the output elsewhere")
    if path.is_dir():
        raise ValueError(f"{flag} {path}: is a folder, expected a file name")
    if path.exists() and not overwrite:
        raise ValueError(f"{flag} {path}: the file exists (pass --overwrite to replace it)")
    folder = path.parent
    if not folder.is_dir():
        raise ValueError(f"{flag} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: the folder {folder} is not writable")
    return path


def open_safetensors(path: str | os.PathLike) -> Any:
    """A ``safe_open`` handle of a ``.safetensors`` file (tensors are read on ``get_tensor``)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weight file not found")
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable .safetensors file ({err})") from None


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON object from ``path``; a clear one-line error when missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def weight_files(folder: str | os.PathLike) -> tuple[Path, list[Path]]:
    """(the file that names a Hugging Face folder's weights, its weight files): the index and its
    shards, or the single file; safetensors first, else ``pytorch_model.bin``."""
    folder = Path(folder)
    for index, single in FOLDER_WEIGHTS:
        if (folder / index).is_file():
            weight_map = read_json(folder / index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{folder / index}: expected a non-empty 'weight_map' object")
            return folder / index, [folder / name for name in sorted(set(weight_map.values()))]
        if (folder / single).is_file():
            return folder / single, [folder / single]
    names = " / ".join(name for pair in FOLDER_WEIGHTS for name in pair)
    raise CheckpointError(f"{folder}: no weights ({names})")


def _file_readers(path: Path) -> dict[str, Callable[[], torch.Tensor]]:
    """{key: a reader of that tensor} of one weight file of a folder."""
    if path.suffix in SAFETENSORS_SUFFIXES:
        handle = open_safetensors(path)
        return {key: functools.partial(handle.get_tensor, key) for key in handle.keys()}
    state = weights_of(load_checkpoint(path, mmap=True), str(path))
    return {key: functools.partial(state.__getitem__, key) for key in state}


def open_folder(folder: str | os.PathLike) -> tuple[str, dict[str, Callable[[], torch.Tensor]]]:
    """(the file naming the weights, {key: a reader of that tensor}) of a Hugging Face folder."""
    if not Path(folder).is_dir():
        raise CheckpointError(f"{folder}: not a folder")
    source, files = weight_files(folder)
    readers: dict[str, Callable[[], torch.Tensor]] = {}
    for path in files:
        readers.update(_file_readers(path))
    return str(source), readers


def _key_list(keys: Sequence[str], shown: int = 4) -> str:
    return f"{len(keys)} ({', '.join(keys[:shown])}{', ...' if len(keys) > shown else ''})"


def _in_order(keys: Iterable[str]) -> list[str]:
    """The keys in their given order (a state dict's), sorted when they come as a set."""
    return sorted(keys) if isinstance(keys, (set, frozenset)) else list(keys)


def wrong_shape(key: str, found: Sequence[int], expected: Sequence[int]) -> str:
    """How ``check_keys`` names a tensor of the wrong shape."""
    return f"{key} {tuple(found)} (expected {tuple(expected)})"


def check_keys(source: str, layout: str, found: Iterable[str], expected: Iterable[str],
               optional: tuple[str, ...] = (), wrong: Sequence[str] = ()) -> None:
    """Strict key match of a file (``source``) against ``layout``: raise one ``CheckpointError``
    line naming the missing keys (those starting with an ``optional`` prefix may be absent), the
    unexpected keys and the tensors of the wrong shape (``wrong``: ``wrong_shape`` strings)."""
    found, expected = _in_order(found), _in_order(expected)
    found_set, expected_set = set(found), set(expected)
    missing = [k for k in expected if k not in found_set]
    raise_mismatch(source, layout, missing, [k for k in found if k not in expected_set], wrong, optional)


def raise_mismatch(source: str, layout: str, missing: Sequence[str], unexpected: Sequence[str],
                   wrong: Sequence[str] = (), optional: tuple[str, ...] = ()) -> None:
    """The one error format of a file that does not fit: nothing happens when all lists are empty."""
    missing = [k for k in missing if not (optional and k.startswith(optional))]
    parts = ([f"missing keys {_key_list(missing)}"] if missing else []) + (
        [f"unexpected keys {_key_list(unexpected)}"] if unexpected else []) + (
        [f"wrong shapes {len(wrong)} ({'; '.join(list(wrong)[:3])}{', ...' if len(wrong) > 3 else ''})"]
        if wrong else [])
    if parts:
        raise CheckpointError(f"{source}: does not fit the {layout} layout: " + "; ".join(parts))


def load_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str,
                optional: tuple[str, ...] = (), layout: str | None = None) -> None:
    """``module.load_state_dict(state)`` with every key and shape checked (``layout``: the module's
    class name unless given); a mismatch raises in ``raise_mismatch``'s format. Keys of ``module``
    that start with a prefix in ``optional`` may be absent (they keep their current values). The
    keys come from ``load_state_dict`` itself, so the modules' load hooks (e.g. dropping CLIP's
    ``position_ids`` buffer) apply."""
    layout = layout or type(module).__name__
    expected = module.state_dict()
    wrong = [wrong_shape(k, v.shape, expected[k].shape) for k, v in state.items()
             if k in expected and v.shape != expected[k].shape]
    raise_mismatch(source, layout, [], [], wrong)
    result = module.load_state_dict(dict(state), strict=False)
    raise_mismatch(source, layout, result.missing_keys, result.unexpected_keys, optional=optional)
