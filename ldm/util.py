"""Config-driven construction, as in the CompVis repositories."""
import importlib
from typing import Any, Mapping

import torch

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
    """Build ``config.target(**config.params)``."""
    if "target" not in config:
        raise KeyError(f"expected a 'target' key in the config, got keys {sorted(config)}")
    params = config.get("params", None) or {}
    return get_obj_from_str(config["target"])(**params)
