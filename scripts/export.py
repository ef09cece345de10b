"""Export a slim sd-v1 inference checkpoint from a training checkpoint (see ``ldm/export.py``).

    python scripts/export.py logs/<run>/checkpoints/last.ckpt dog.safetensors --dtype fp16
    python scripts/export.py last.ckpt dog.ckpt --no-ema --diffusers dog-diffusers \\
        --config logs/<run>/configs/<time>-project.yaml
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import OmegaConf

from core.cli import ArgumentParser, run_cli
from core.config import DTYPES, load_config
from core.weights import check_output
from ldm.export import check_new_folder, export, save_diffusers


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="training checkpoint (Lightning last.ckpt) or any sd-v1 .ckpt / .safetensors")
    p.add_argument("out", help="output file: .safetensors or .ckpt")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="UNet weights from the EMA (default: when the checkpoint has them)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the network weights")
    p.add_argument("--diffusers", metavar="DIR", help="also write a diffusers-format folder here")
    p.add_argument("--config", default="configs/v1-inference.yaml",
                   help="the model's config (for --diffusers: sizes of the text encoder, schedule)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT when it exists (never the input)")
    p.add_argument("--base_weights", metavar="FILE",
                   help="a lean training checkpoint's base file, when it was moved (its sha256 is checked)")
    return p.parse_args(argv)


def run(opt: argparse.Namespace) -> list[Path]:
    check_output(opt.out, "out", opt.overwrite, inputs=[opt.ckpt] + ([opt.base_weights] if opt.base_weights else []))
    config = None
    if opt.diffusers:
        check_new_folder(opt.diffusers)
        config = load_config([opt.config])
    path, state = export(opt.ckpt, opt.out, ema=opt.ema, dtype=opt.dtype, base=opt.base_weights)
    written = [path]
    if opt.diffusers:
        written.append(save_diffusers(state, OmegaConf.to_container(config, resolve=True), opt.diffusers, opt.dtype))
    return written


def export_cli(argv: list[str]) -> int:
    written = run(parse_args(argv))
    print("wrote " + ", ".join(map(str, written)))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run; a bad input is one line on stderr and exit status 2 (``core.cli``)."""
    return run_cli("export.py", export_cli, argv)


if __name__ == "__main__":
    sys.exit(main())
