"""Optimizers: one parameter-group rule and one builder for every system.

A group holds trainable parameters with one learning-rate scale and one weight decay. The no-decay
rule (LAVIS ``get_optimizer_params``): tensors with fewer than two dimensions (biases, norms, scalars
such as BLIP-2's temperature) get no weight decay (``param_groups``; latent diffusion, as CompVis, gives
its own groups no ``weight_decay`` and so AdamW's default decay on every tensor). ``lr_scale(name)``
gives per-parameter scales (BLIP-2's layer-wise ViT decay); a group's learning rate is
``lr * lr_scale``, and ``set_lr`` applies a schedule's value the same way.

The optimizer is named by every system's ``optimizer`` parameter (``model.params.optimizer``), one
vocabulary: ``adamw`` (``torch.optim.AdamW``, the default, with torch's default step: multi-tensor on
CUDA, one tensor at a time on a CPU), ``adamw_fused``
(the same AdamW with ``fused=True``: one kernel updates every parameter, the same update up to float
rounding; 4x faster than the default step on a CPU thread for 98M parameters, timed once by hand; every
trained parameter must be a float tensor on one CPU or CUDA device), or ``adamw8bit`` (bitsandbytes'
``AdamW8bit``: block-wise 8-bit moments, 2 bytes a parameter instead of 8; Dettmers et al. 2022,
arXiv 2110.02861). ``check_optimizer`` runs in the systems' constructors, so a missing bitsandbytes
is one line before any work starts.
"""
from __future__ import annotations

import importlib.util
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from core.config import instantiate_from_config

ADAMW_DEFAULT_DECAY = 0.01  # torch.optim.AdamW's default weight decay (CompVis / DreamBooth use it)
OPTIMIZERS = ("adamw", "adamw_fused", "adamw8bit")
FUSED_DEVICES = ("cpu", "cuda")  # where torch's fused AdamW kernel runs


def check_optimizer(name: str) -> str:
    """``name`` when it is an optimizer of ``OPTIMIZERS`` that can be built here, else one ``ValueError`` line."""
    if name not in OPTIMIZERS:
        raise ValueError(f"model.params.optimizer={name!r}: expected one of {', '.join(OPTIMIZERS)}")
    if name == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("model.params.optimizer=adamw8bit needs bitsandbytes, which is not installed "
                         "(pip install -e '.[8bit]', or set model.params.optimizer=adamw)")
    return name


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The class of an ``OPTIMIZERS`` name (bitsandbytes is imported only for ``adamw8bit``)."""
    if check_optimizer(name) == "adamw8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit
    return torch.optim.AdamW


def no_decay(param: nn.Parameter) -> bool:
    """True for the tensors that get no weight decay: fewer than two dimensions."""
    return param.ndim < 2


def param_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float,
                 lr_scale: Callable[[str], float] | None = None) -> list[dict[str, Any]]:
    """Groups of the trainable parameters in ``named``: one per (lr scale, decayed or not), each
    with ``params``, ``weight_decay``, ``lr_scale`` and ``name``."""
    groups: dict[tuple[float, bool], dict[str, Any]] = {}
    for key, param in named:
        if not param.requires_grad:
            continue
        exempt = no_decay(param)
        scale = lr_scale(key) if lr_scale is not None else 1.0
        group = groups.setdefault((scale, exempt), {
            "params": [], "weight_decay": 0.0 if exempt else weight_decay, "lr_scale": scale,
            "name": f"lr_x{scale:.4g}_{'no_decay' if exempt else 'decay'}"})
        group["params"].append(param)
    return list(groups.values())


def build_optimizer(groups: Sequence[dict[str, Any]], lr: float, betas: Sequence[float] = (0.9, 0.999),
                    eps: float = 1e-8, weight_decay: float = ADAMW_DEFAULT_DECAY,
                    name: str = "adamw") -> torch.optim.Optimizer:
    """The ``name`` optimizer over ``groups`` (a group without its own ``lr`` gets ``lr * lr_scale``,
    one without its own ``weight_decay`` gets ``weight_decay``)."""
    if not any(group["params"] for group in groups):
        raise ValueError("no trainable parameters: every part of the model is frozen")
    groups = [{**group, "lr": group.get("lr", lr * group.get("lr_scale", 1.0))} for group in groups if group["params"]]
    fused = {"fused": True} if name == "adamw_fused" and check_fusable(groups) else {}
    return optimizer_class(name)(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **fused)


def check_fusable(groups: Sequence[dict[str, Any]]) -> bool:
    """True when torch's fused AdamW can update every parameter of ``groups`` (float tensors on one
    device of ``FUSED_DEVICES``), else one ``ValueError`` line."""
    params = [p for group in groups for p in group["params"]]
    kinds = sorted({(p.device.type, str(p.dtype).removeprefix("torch.")) for p in params})
    if len({d for d, _ in kinds}) == 1 and kinds[0][0] in FUSED_DEVICES and all(p.is_floating_point() for p in params):
        return True
    raise ValueError(f"model.params.optimizer=adamw_fused needs every trained parameter as a float tensor on one "
                     f"{' or '.join(FUSED_DEVICES)} device, found {kinds}: use model.params.optimizer=adamw")


def with_step_schedule(optimizer: torch.optim.Optimizer, scheduler_config: Mapping[str, Any] | None) -> Any:
    """``configure_optimizers``' return value: ``optimizer`` alone, or with a ``LambdaLR`` stepped
    every optimizer step by the ``{target, params}`` multiplier of ``core.schedules`` (its attributes
    go into the scheduler's state in checkpoints)."""
    if scheduler_config is None:
        return optimizer
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=instantiate_from_config(scheduler_config))
    return [optimizer], [{"scheduler": sched, "interval": "step", "frequency": 1}]


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate to ``lr`` times its ``lr_scale`` (a schedule's step)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
