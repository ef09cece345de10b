"""The results of a run so far: an append-only JSONL file that survives a crash.

1. Line 1 is the header ``{"identity": ...}``: what decides the outputs (task, the content hashes
   of the model's files and of the annotation files, the generation settings, prompt, dtype, image
   size). Paths are recorded beside it (``"paths"``) but not compared: a moved file is the same file.
2. Every further line is one result, ``{"key": id, "output": text}``. A batch's lines are written
   with one ``write``, flushed and ``fsync``-ed before the next batch starts, so what a crash leaves
   is whole lines plus at most one torn last line, which the next open cuts off.
3. Opening an existing file for a run of another identity is refused in one line that names the
   file and the first fields that differ (``overwrite=True`` starts the file again).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Hashable, Iterable, Mapping

from core.images import visible_files
from core.lean import file_sha256
from core.weights import atomic_path

SHOWN = 3  # differing fields named in the refusal


def fingerprint(paths: Iterable[str | os.PathLike]) -> dict[str, Any]:
    """The sha256 over every file of the given files and folders (relative names and contents) and
    their total size: the same weights give the same fingerprint wherever they lie."""
    digest, size = hashlib.sha256(), 0
    for path in paths:
        path = Path(path)
        files = sorted(visible_files(path), key=lambda p: p.relative_to(path).as_posix()) if path.is_dir() else [path]
        for file in files:
            name = file.relative_to(path).as_posix() if path.is_dir() else file.name
            digest.update(f"{name}\0{file_sha256(file)}\0".encode())
            size += file.stat().st_size
    return {"sha256": digest.hexdigest(), "bytes": size}


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a.b": value}."""
    if not isinstance(obj, Mapping):
        return {prefix: obj}
    flat: dict[str, Any] = {}
    for key, value in obj.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def differences(now: Mapping[str, Any], before: Mapping[str, Any]) -> list[str]:
    """'field: value now / value in the file' for each field that differs."""
    a, b = flatten(now), flatten(before)
    return [f"{k}: {a.get(k)!r} now, {b.get(k)!r} in the file" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _parse(path: Path, text: str) -> tuple[dict, dict[Hashable, str], int]:
    """(header, {key: output}, bytes of whole lines) of a partial file's text."""
    whole = text[: text.rfind("\n") + 1]  # a torn last line is dropped
    lines = whole.splitlines()
    try:
        header = json.loads(lines[0]) if lines else None
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or "identity" not in header:
        raise ValueError(f"{path}: not a partial results file of evaluate_blip2 (line 1 is no header); "
                         "give --overwrite to replace it")
    done: dict[Hashable, str] = {}
    for n, line in enumerate(lines[1:], start=2):
        try:
            record = json.loads(line)
            done[record["key"]] = record["output"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}: line {n} is not a result record {{'key', 'output'}}") from None
    return header, done, len(whole.encode("utf-8"))


class PartialResults:
    """Open (or start) the partial file of a run; ``done`` holds the results already there."""

    def __init__(self, path: str | os.PathLike, identity: Mapping[str, Any], paths: Mapping[str, Any],
                 overwrite: bool = False):
        self.path = Path(path)
        identity = json.loads(json.dumps(identity))  # as it reads back (tuples -> lists)
        self.done: dict[Hashable, str] = {}
        if self.path.exists() and not overwrite:
            header, self.done, size = _parse(self.path, self.path.read_text(encoding="utf-8"))
            diff = differences(identity, header["identity"])
            if diff:
                shown = "; ".join(diff[:SHOWN]) + (f"; and {len(diff) - SHOWN} more" if len(diff) > SHOWN else "")
                raise ValueError(f"{self.path}: results of a different run ({shown}); "
                                 "give --overwrite to discard them, or another --out")
            os.truncate(self.path, size)
        else:
            with atomic_path(self.path) as tmp:
                header = {"identity": identity, "paths": dict(paths)}
                tmp.write_text(json.dumps(header, ensure_ascii=False) + "\n", encoding="utf-8")
        self._file = open(self.path, "a", encoding="utf-8")

    def append(self, results: Iterable[tuple[Hashable, str]]) -> None:
        """Add one batch of (key, output) pairs, durably, in one write."""
        results = list(results)
        lines = "".join(json.dumps({"key": k, "output": o}, ensure_ascii=False) + "\n" for k, o in results)
        self._file.write(lines)
        self._file.flush()
        os.fsync(self._file.fileno())
        self.done.update(results)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "PartialResults":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
