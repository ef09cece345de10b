"""Configs: OmegaConf YAML files merged in order, and ``instantiate_from_config`` (CompVis)."""
from __future__ import annotations

import importlib
import inspect
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from omegaconf import OmegaConf

from core.cli import first_line

# The precision names the configs and scripts accept.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# Configs and run folders are code: a ``target`` names something to import and call. Without the
# user's leave, only the project's classes and builders, and classes of torch.nn / torch.optim and
# lightning's callbacks and loggers are built (a config from elsewhere cannot run
# ``os.system`` or ``torch.load``); ``DB2_ALLOW_TARGETS=pkg1,pkg2.mod`` allows more, by prefix.
PROJECT_TARGETS = ("core.", "ldm.", "blip2.", "toy.")
CLASSES_ONLY = ("torch.nn.", "torch.optim.", "lightning.pytorch.callbacks.", "lightning.pytorch.loggers.",
                "pytorch_lightning.callbacks.", "pytorch_lightning.loggers.")  # never torch.load and the like
ALLOWED_TARGETS = PROJECT_TARGETS + CLASSES_ONLY
ALLOW_ENV = "DB2_ALLOW_TARGETS"
SIMPLE_TYPES = (bool, int, float, str, type(None))


def allowed_prefixes() -> tuple[str, ...]:
    extra = [p.strip() for p in os.environ.get(ALLOW_ENV, "").split(",") if p.strip()]
    return ALLOWED_TARGETS + tuple(p if p.endswith(".") else p + "." for p in extra)


def get_obj_from_str(path: str) -> Any:
    """Return the object named by a dotted path such as ``ldm.models.autoencoder.AutoencoderKL``; a
    path outside ``allowed_prefixes()`` is refused before anything is imported."""
    module, _, name = path.rpartition(".")
    if not module:
        raise ValueError(f"target {path!r} is not a dotted 'module.Object' path")
    if not path.startswith(allowed_prefixes()):
        top = path.split(".")[0]
        raise ValueError(f"target {path!r}: not a class of this project, torch.nn/optim or lightning; configs are "
                         f"code, so it is refused (if you trust the config, allow it: {ALLOW_ENV}={top})")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import target {path!r}: {err}") from None


def _init_hints(target: Any) -> dict[str, Any]:
    """The annotated parameters of ``target``'s constructor, following ``**kwargs`` up the MRO."""
    hints: dict[str, Any] = {}
    for cls in getattr(target, "__mro__", ()):
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        try:
            found = typing.get_type_hints(init)
            kinds = {p.kind for p in inspect.signature(init).parameters.values()}
        except Exception:  # an annotation that cannot be evaluated: nothing checked there
            return hints
        hints = {**found, **hints}
        if inspect.Parameter.VAR_KEYWORD not in kinds:
            break
    return hints


def _simple(annotation: Any) -> tuple[type, ...] | None:
    """The types of a ``bool`` / ``int`` / ``float`` / ``str`` (or None) annotation, else None."""
    members = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    return tuple(members) if members and all(m in SIMPLE_TYPES for m in members) else None


def _fits(value: Any, kinds: tuple[type, ...]) -> bool:
    """``value`` is one of ``kinds`` (an int counts as a float; a bool is not an int here)."""
    if isinstance(value, bool):
        return bool in kinds
    if isinstance(value, int):
        return int in kinds or float in kinds
    return isinstance(value, tuple(k for k in kinds if k is not bool))


def check_params(where: str, target: Any, params: Mapping[str, Any]) -> None:
    """A config value of the wrong simple type (``model_channels: abc``) is one line naming it."""
    hints = _init_hints(target) if isinstance(target, type) else {}
    for key, value in params.items():
        kinds = _simple(hints.get(key))
        if kinds is not None and not _fits(value, kinds):
            expected = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            raise ValueError(f"{where}: {key}={value!r} is not {expected}")


_ARGUMENT_ERROR = re.compile(r"(got an unexpected keyword argument|missing \d+ required (keyword-only |positional )?"
                             r"arguments?|got multiple values for argument)")


def instantiate_from_config(config: Mapping) -> Any:
    """Build ``config.target(**config.params)``.

    A class that accepts parameters of older configs only for compatibility (CompVis's) defines
    ``from_config_params(**params)``, which validates and drops them before calling the class;
    it is then used instead of the class itself. A parameter the class does not take, or of the
    wrong simple type, is one ``ValueError`` line naming the target and the parameter.
    """
    if "target" not in config:
        raise KeyError(f"expected a 'target' key in the config, got keys {sorted(config)}")
    params = config.get("params", None) or {}
    target = get_obj_from_str(config["target"])
    if not isinstance(target, type) and config["target"].startswith(CLASSES_ONLY):
        raise ValueError(f"target {config['target']!r} is not a class")
    check_params(config["target"], target, params)
    try:
        return getattr(target, "from_config_params", target)(**params)
    except TypeError as err:
        if _ARGUMENT_ERROR.search(str(err)):
            raise ValueError(f"{config['target']}: {err}") from None
        raise


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
