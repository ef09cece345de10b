"""Checkpoint sizes of BLIP-2 training at full size, computed from the config (built on the meta
device, nothing allocated): every weight stored, against the lean checkpoint (``core.lean``: the
frozen parts left out), each with AdamW's two fp32 moments of the trained ones.

    python -m benchmarks.checkpoint_size                  # OPT-2.7b, ViT frozen (stage 2)
    python -m benchmarks.checkpoint_size --size 6.7b --train_vit
    python -m benchmarks.checkpoint_size --stage1         # configs/blip2/pretrain_stage1.yaml
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from blip2.config import blip2_opt
from blip2.models.finetune import frozen_modules
from blip2.modules.blip2_opt import Blip2OPT
from core.cli import ArgumentParser, run_cli
from core.config import instantiate_from_config, load_config

GB = 1e9
STAGE1_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "blip2" / "pretrain_stage1.yaml"


def _bytes(params: Iterable[nn.Parameter], frozen: set[int]) -> dict[str, float]:
    """Counts and bytes of fp32 ``params`` (tied weights once, as torch.save stores them), the ids in
    ``frozen`` left out of the lean checkpoint."""
    params = list(params)
    trained = sum(p.numel() for p in params if id(p) not in frozen)
    left_out = sum(p.numel() for p in params if id(p) in frozen)
    kept = trained * (4 + 8)  # fp32 weights and two fp32 AdamW moments
    return {"params": trained + left_out, "trained": trained, "lean": kept,
            "full_fp32": kept + left_out * 4, "full_bf16": kept + left_out * 2}


def sizes(size: str = "2.7b", freeze_vit: bool = True) -> dict[str, float]:
    """Parameter counts and checkpoint bytes of a ``Blip2OPTFinetune`` with a frozen OPT."""
    model = Blip2OPT.from_config(blip2_opt(size), device="meta")
    frozen = {id(p) for part in frozen_modules(model, freeze_vit, False, True) for p in part.parameters()}
    return _bytes(model.parameters(), frozen)


def stage1_sizes(config: str | Path = STAGE1_CONFIG) -> dict[str, float]:
    """The same for the ``Blip2Stage1`` the config's ``model`` builds (its frozen parameters: the ViT
    but ``ln_vision``; no start weights read)."""
    model_config = load_config([str(config)]).model
    params = {**model_config.params, "vision_weights": None, "bert_weights": None, "tokenizer": None}
    with torch.device("meta"):
        system = instantiate_from_config({"target": model_config.target, "params": params})
    return _bytes(system.parameters(), {id(p) for p in system.parameters() if not p.requires_grad})


def run(argv: Sequence[str]) -> int:
    p = ArgumentParser(prog="python -m benchmarks.checkpoint_size", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="2.7b", choices=["2.7b", "6.7b"])
    p.add_argument("--train_vit", action="store_true", help="the ViT trains too (caption fine-tuning)")
    p.add_argument("--stage1", action="store_true", help="stage 1 (configs/blip2/pretrain_stage1.yaml) instead")
    opt = p.parse_args(argv)
    if opt.stage1:
        s, what = stage1_sizes(), "BLIP-2 stage 1 (EVA ViT-g frozen, Q-Former)"
    else:
        s, what = sizes(opt.size, freeze_vit=not opt.train_vit), f"BLIP-2 OPT-{opt.size}"
    print(f"{what}: {s['params'] / 1e9:.3f} B parameters, {s['trained'] / 1e6:.1f} M trained")
    half = "" if opt.stage1 else f" (frozen parts in bf16: {s['full_bf16'] / GB:.2f} GB)"  # stage 1 keeps fp32
    print(f"every weight stored: {s['full_fp32'] / GB:.2f} GB{half}")
    print(f"lean checkpoint:     {s['lean'] / GB:.2f} GB")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("checkpoint_size", run, argv)


if __name__ == "__main__":
    sys.exit(main())
