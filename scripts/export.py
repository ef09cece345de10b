"""Export a slim sd-v1 inference checkpoint from a training checkpoint (see ``ldm/export.py``).

    python scripts/export.py logs/<run>/checkpoints/last.ckpt dog.safetensors --dtype fp16
    python scripts/export.py last.ckpt dog.ckpt --no-ema --diffusers dog-diffusers \\
        --config logs/<run>/configs/<time>-project.yaml
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omegaconf import OmegaConf  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402

from core.weights import CheckpointError  # noqa: E402
from ldm.export import DTYPES, check_new_folder, export, save_diffusers  # noqa: E402
from core.config import load_config  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="training checkpoint (Lightning last.ckpt) or any sd-v1 .ckpt / .safetensors")
    p.add_argument("out", help="output file: .safetensors or .ckpt")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="UNet weights from the EMA (default: when the checkpoint has them)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the network weights")
    p.add_argument("--diffusers", metavar="DIR", help="also write a diffusers-format folder here")
    p.add_argument("--config", default="configs/v1-inference.yaml",
                   help="the model's config (for --diffusers: sizes of the text encoder, schedule)")
    return p.parse_args(argv)


def run(opt: argparse.Namespace) -> list[Path]:
    config = None
    if opt.diffusers:
        check_new_folder(opt.diffusers)
        config = load_config([opt.config])
    path, state = export(opt.ckpt, opt.out, ema=opt.ema, dtype=opt.dtype)
    written = [path]
    if opt.diffusers:
        written.append(save_diffusers(state, OmegaConf.to_container(config, resolve=True), opt.diffusers, opt.dtype))
    return written


def main(argv: list[str] | None = None) -> int:
    opt = parse_args(argv)
    try:
        written = run(opt)
    except (CheckpointError, FileNotFoundError, ValueError, KeyError, OmegaConfBaseException) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("wrote " + ", ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
