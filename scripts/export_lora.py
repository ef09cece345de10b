"""Export the LoRA adapters of a DreamBooth LoRA run (see ``ldm/lora_export.py``).

    python scripts/export_lora.py logs/<run>/checkpoints/last.ckpt \\
        --config logs/<run>/configs/<time>-project.yaml --kohya dog-lora.safetensors \\
        [--peft dog-peft.safetensors] [--merged dog.safetensors] [--dtype fp16]

``--kohya``: A1111 / ComfyUI / kohya format (``scripts/sample.py --lora`` reads it); ``--peft``: the
diffusers format (``StableDiffusionPipeline.load_lora_weights``); ``--merged``: a full sd-v1 file
with the adapters merged into the base weights. alpha comes from the config's ``model.params.lora``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.cli import ArgumentParser, run_cli
from core.config import DTYPES, load_config
from core.weights import check_output
from ldm.export import export_weights, read_training_checkpoint
from ldm.lora_export import has_adapters, merged_state_dict, peft_state_dict, save_kohya, save_lora
from ldm.modules.lora import LoRAConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="training checkpoint of a LoRA run (Lightning last.ckpt)")
    p.add_argument("--config", required=True, help="the run's config (its model.params.lora gives alpha)")
    p.add_argument("--kohya", metavar="FILE", help="write the adapters here, kohya format (.safetensors)")
    p.add_argument("--peft", metavar="FILE", help="write the adapters here, diffusers / peft format (.safetensors)")
    p.add_argument("--merged", metavar="FILE", help="write a full sd-v1 file, adapters merged (.safetensors / .ckpt)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the written weights")
    p.add_argument("--overwrite", action="store_true", help="replace the output files that exist (never the input)")
    p.add_argument("--base_weights", metavar="FILE",
                   help="a lean training checkpoint's base file, when it was moved (its sha256 is checked)")
    return p.parse_args(argv)


def lora_facts(config_path: str) -> tuple[float, int]:
    """(alpha, the UNet's num_res_blocks) of the run's config (a checkpoint may hold the adapters only)."""
    params = load_config([config_path]).model.params
    if params.get("lora") is None:
        raise ValueError(f"--config {config_path}: model.params.lora is null (not a LoRA run)")
    alpha = LoRAConfig.from_mapping(params.lora, f"{config_path}: model.params.lora").scale_alpha
    return alpha, params.unet_config.params.num_res_blocks


def run(opt: argparse.Namespace) -> list[Path]:
    if not (opt.kohya or opt.peft or opt.merged):
        raise ValueError("nothing to write: pass --kohya, --peft and/or --merged")
    inputs = [opt.ckpt] + ([opt.base_weights] if opt.base_weights else [])
    outputs = {flag: getattr(opt, flag) for flag in ("kohya", "peft", "merged") if getattr(opt, flag)}
    for flag, out in outputs.items():
        check_output(out, f"--{flag}", opt.overwrite, inputs)
    if len({str(Path(out).absolute()) for out in outputs.values()}) < len(outputs):
        raise ValueError(f"{', '.join(f'--{f}' for f in outputs)}: two outputs name the same file")
    alpha, num_res_blocks = lora_facts(opt.config)
    weights, facts = read_training_checkpoint(opt.ckpt, opt.base_weights)
    if not has_adapters(weights):
        raise ValueError(f"{opt.ckpt}: no LoRA adapters (no *.lora_down.weight keys)")
    dtype = DTYPES[opt.dtype]
    written = []
    if opt.kohya:
        written.append(save_kohya(weights, alpha, opt.kohya, facts, dtype, num_res_blocks))
    if opt.peft:
        peft = {k: v.to(dtype) for k, v in peft_state_dict(weights, alpha, num_res_blocks).items()}
        written.append(save_lora(peft, opt.peft, facts))
    if opt.merged:
        merged = merged_state_dict(weights, alpha)
        written.append(export_weights(merged, opt.ckpt, opt.merged, facts, ema=False, dtype=opt.dtype)[0])
    return written


def export_lora_cli(argv: list[str]) -> int:
    print("wrote " + ", ".join(map(str, run(parse_args(argv)))))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run; a bad input is one line on stderr and exit status 2 (``core.cli``)."""
    return run_cli("export_lora.py", export_lora_cli, argv)


if __name__ == "__main__":
    sys.exit(main())
