"""Checkpoint sizes of BLIP-2 stage-2 / caption fine-tuning at full size, computed from the config
(built on the meta device, nothing allocated): every weight stored, against the lean checkpoint
(``core.lean``: the frozen parts left out), each with AdamW's two fp32 moments of the trained ones.

    python -m benchmarks.checkpoint_size                  # OPT-2.7b, ViT frozen (stage 2)
    python -m benchmarks.checkpoint_size --size 6.7b --train_vit
"""
from __future__ import annotations

import sys
from typing import Sequence

from blip2.config import blip2_opt
from blip2.models.finetune import frozen_modules
from blip2.modules.blip2_opt import Blip2OPT
from core.cli import ArgumentParser, run_cli

GB = 1e9


def sizes(size: str = "2.7b", freeze_vit: bool = True) -> dict[str, float]:
    """Parameter counts and checkpoint bytes of a ``Blip2OPTFinetune`` with a frozen OPT."""
    model = Blip2OPT.from_config(blip2_opt(size), device="meta")
    frozen = {id(p) for part in frozen_modules(model, freeze_vit, False, True) for p in part.parameters()}
    params = list(model.parameters())  # tied weights once, as torch.save stores them
    trained = sum(p.numel() for p in params if id(p) not in frozen)
    left_out = sum(p.numel() for p in params if id(p) in frozen)
    kept = trained * (4 + 8)  # fp32 weights and two fp32 AdamW moments
    return {"params": trained + left_out, "trained": trained, "lean": kept,
            "full_fp32": kept + left_out * 4, "full_bf16": kept + left_out * 2}


def run(argv: Sequence[str]) -> int:
    p = ArgumentParser(prog="python -m benchmarks.checkpoint_size", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="2.7b", choices=["2.7b", "6.7b"])
    p.add_argument("--train_vit", action="store_true", help="the ViT trains too (caption fine-tuning)")
    opt = p.parse_args(argv)
    s = sizes(opt.size, freeze_vit=not opt.train_vit)
    print(f"BLIP-2 OPT-{opt.size}: {s['params'] / 1e9:.3f} B parameters, {s['trained'] / 1e6:.1f} M trained")
    print(f"every weight stored: {s['full_fp32'] / GB:.2f} GB (frozen parts in bf16: {s['full_bf16'] / GB:.2f} GB)")
    print(f"lean checkpoint:     {s['lean'] / GB:.2f} GB")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("checkpoint_size", run, argv)


if __name__ == "__main__":
    sys.exit(main())
