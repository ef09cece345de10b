"""Checkpoint IO: safe .ckpt reading, .safetensors, atomic writes."""
import os
import sys
import types

import numpy as np
import pytest
import torch

from core.weights import CheckpointError, atomic_path, load_checkpoint, load_state_dict, save_checkpoint


def _fake_lightning_callback_class():
    """A class importable as pytorch_lightning's ModelCheckpoint, as sd-v1 .ckpt files reference it."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    saved = {n: sys.modules.get(n) for n in names}
    mod = types.ModuleType(names[-1])
    cls = type("ModelCheckpoint", (), {"__module__": names[-1]})
    mod.ModelCheckpoint = cls
    for n in names[:-1]:
        sys.modules[n] = types.ModuleType(n)
    sys.modules[names[-1]] = mod
    return cls, saved


def _restore(saved):
    for n, m in saved.items():
        if m is None:
            sys.modules.pop(n, None)
        else:
            sys.modules[n] = m


def test_lightning_style_ckpt_loads_without_unpickling_code(tmp_path):
    weights = {"model.w": torch.randn(3, 2), "betas": torch.linspace(0, 1, 5)}
    cls, saved = _fake_lightning_callback_class()
    try:
        torch.save({"state_dict": weights, "epoch": 6, "global_step": 470000,
                    "callbacks": {cls: {"best_model_score": np.float64(0.25), "dtype": np.dtype("float32")}}},
                   tmp_path / "sd.ckpt")
    finally:
        _restore(saved)
    sd = load_state_dict(tmp_path / "sd.ckpt")
    assert sd.keys() == weights.keys()
    assert all(torch.equal(sd[k], weights[k]) for k in weights)
    assert load_checkpoint(tmp_path / "sd.ckpt")["global_step"] == 470000


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_with_code_is_refused(tmp_path):
    torch.save({"state_dict": {"a": torch.zeros(1)}, "x": _Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match=r"evil\.ckpt: refused to load.*(system|posix)"):
        load_state_dict(tmp_path / "evil.ckpt")


def test_safetensors_round_trip_and_metadata(tmp_path):
    weights = {"a.b": torch.randn(4, 3), "c": torch.arange(5)}
    path = save_checkpoint(weights, tmp_path / "w.safetensors", metadata={"format": "pt"})
    loaded = load_state_dict(path)
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_missing_and_garbage_files_give_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match="nothere.ckpt: checkpoint file not found"):
        load_state_dict(tmp_path / "nothere.ckpt")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="junk.safetensors: not a readable .safetensors"):
        load_state_dict(tmp_path / "junk.safetensors")
    (tmp_path / "junk.ckpt").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="junk.ckpt"):
        load_state_dict(tmp_path / "junk.ckpt")
    torch.save({"state_dict": {"a": "text"}}, tmp_path / "str.ckpt")
    with pytest.raises(CheckpointError, match="key 'a' holds str"):
        load_state_dict(tmp_path / "str.ckpt")


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "model.ckpt"
    save_checkpoint({"w": torch.ones(2)}, target)
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert torch.equal(load_state_dict(target)["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt"]


def test_atomic_write_gives_ordinary_file_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        path = save_checkpoint({"w": torch.ones(1)}, tmp_path / "a.safetensors")
        assert path.stat().st_mode & 0o777 == 0o644
        os.chmod(path, 0o600)
        save_checkpoint({"w": torch.zeros(1)}, path)
        assert path.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(umask)
