"""Configs: OmegaConf YAML files merged in order, and ``instantiate_from_config`` (CompVis)."""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from omegaconf import OmegaConf

from core.cli import first_line

# The precision names the configs and scripts accept.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def get_obj_from_str(path: str) -> Any:
    """Return the object named by a dotted path such as ``ldm.models.autoencoder.AutoencoderKL``."""
    module, _, name = path.rpartition(".")
    if not module:
        raise ValueError(f"target {path!r} is not a dotted 'module.Object' path")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import target {path!r}: {err}") from None


def instantiate_from_config(config: Mapping) -> Any:
    """Build ``config.target(**config.params)``.

    A class that accepts parameters of older configs only for compatibility (CompVis's) defines
    ``from_config_params(**params)``, which validates and drops them before calling the class;
    it is then used instead of the class itself.
    """
    if "target" not in config:
        raise KeyError(f"expected a 'target' key in the config, got keys {sorted(config)}")
    params = config.get("params", None) or {}
    target = get_obj_from_str(config["target"])
    return getattr(target, "from_config_params", target)(**params)


def load_config(paths: Sequence[str | os.PathLike]) -> Any:
    """Merge YAML files in order (later ones override earlier ones); a missing file or a YAML
    syntax error is one ``ValueError`` line naming the file."""
    configs = []
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"{p}: config file not found")
        try:
            configs.append(OmegaConf.load(p))
        except Exception as err:  # yaml's ScannerError / ParserError, OmegaConf's own errors
            raise ValueError(f"{p}: not a readable YAML config ({first_line(err)})") from None
    return OmegaConf.merge(*configs)
