"""Text-to-image sampling with a Stable Diffusion v1 checkpoint (the CompVis txt2img conventions).

    python scripts/sample.py --prompt "a photograph of an astronaut riding a horse" \
        --ckpt models/ldm/stable-diffusion-v1/model.ckpt --plms

Seeds: image i of a run (its running index, counted over rounds and prompt batches, from 0) starts
from the noise of seed ``--seed + i``; with ``--fixed_code`` every round reuses the seeds of round 0.
The images come from ``ldm.txt2img``, the path the training-time sample grids and class images
take, so a prompt, seed and settings give the same image here, there, and on any device. Bad input
is one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from core.cli import ArgumentParser, run_cli
from core.config import load_config
from core.images import make_grid, next_index, save_png
from ldm.loading import load_model, pixel_multiple
from ldm.lora_export import merge_kohya
from ldm.modules.encoders.tokenizer import CLIPTokenizer
from ldm.txt2img import sampling_mode, txt2img


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", default="a painting of a virus monster playing guitar")
    p.add_argument("--from-file", dest="from_file", help="one prompt per line (overrides --prompt)")
    p.add_argument("--negative_prompt", default="", help="the unconditional prompt of the guidance")
    p.add_argument("--ckpt", default="models/ldm/stable-diffusion-v1/model.ckpt")
    p.add_argument("--config", default="configs/v1-inference.yaml")
    p.add_argument("--lora", metavar="FILE", help="merge this LoRA (kohya .safetensors) into the weights")
    p.add_argument("--lora_scale", type=float, default=1.0, help="strength of --lora (W + S * delta W)")
    p.add_argument("--base_weights", metavar="FILE",
                   help="a lean training checkpoint's base file, when it was moved (its sha256 is checked)")
    p.add_argument("--random_init", action="store_true", help="no checkpoint: random weights (a smoke test)")
    p.add_argument("--outdir", default="outputs/txt2img-samples")
    p.add_argument("--ddim_steps", type=int, default=50)
    p.add_argument("--plms", action="store_true", help="use PLMS instead of DDIM")
    p.add_argument("--ddim_eta", type=float, default=0.0)
    p.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--n_samples", type=int, default=3, help="batch size: samples per prompt")
    p.add_argument("--n_iter", type=int, default=2, help="sampling rounds")
    p.add_argument("--H", type=int, default=512)
    p.add_argument("--W", type=int, default=512)
    p.add_argument("--seed", type=int, default=42, help="image i of the run gets seed SEED + i")
    p.add_argument("--fixed_code", action="store_true", help="every round reuses the seeds of round 0")
    p.add_argument("--precision", choices=["full", "autocast"], default="autocast")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip_grid", action="store_true")
    p.add_argument("--truncate", action="store_true", help="cut prompts longer than the text encoder reads")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (built at the first step)")
    p.add_argument("--channels_last", action="store_true",
                   help="the UNet's convolutions in channels-last memory order (model.params.channels_last)")
    return p.parse_args(argv)


def read_prompts(opt: argparse.Namespace) -> list[list[str]]:
    """Batches of ``n_samples`` prompts: one prompt repeated, or the file's lines in chunks."""
    if not opt.from_file:
        return [[opt.prompt] * opt.n_samples]
    path = Path(opt.from_file)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prompt file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[:err.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"{path}: no prompts in the file")
    return [lines[i:i + opt.n_samples] for i in range(0, len(lines), opt.n_samples)]


def check(opt: argparse.Namespace, factor: int) -> None:
    for name in ("H", "W"):
        if getattr(opt, name) < 1 or getattr(opt, name) % factor:
            raise ValueError(f"--{name} {getattr(opt, name)} must be a positive multiple of {factor} (the VAE factor "
                             "times the UNet's down-sampling)")
    for name in ("n_samples", "n_iter", "ddim_steps"):
        if getattr(opt, name) < 1:
            raise ValueError(f"--{name} {getattr(opt, name)}: expected a positive integer")
    if opt.from_file is None and not opt.prompt.strip():
        raise ValueError("--prompt is empty: give a prompt (what to avoid goes in --negative_prompt)")
    if opt.plms and opt.ddim_eta != 0:
        raise ValueError("--plms is deterministic: --ddim_eta must be 0")


def check_lengths(batches: list[list[str]], config: Any, truncate: bool) -> None:
    """A prompt longer than the text encoder reads is refused (or, with --truncate, cut with a warning)."""
    if truncate:
        return
    length = OmegaConf.select(config, "model.params.cond_stage_config.params.max_length", default=77)
    tokenizer = CLIPTokenizer(context_length=length)
    for n, prompt in enumerate((p for batch in batches for p in batch), start=1):
        tokens = len(tokenizer.encode(prompt))
        if tokens > length - 2:
            raise ValueError(f"prompt {n} is {tokens} tokens; the text encoder reads {length - 2} (pass --truncate "
                             f"to keep the first {length - 2}): {prompt[:40]!r}...")


def image_seeds(opt: argparse.Namespace, batches: list[list[str]]) -> list[list[list[int]]]:
    """seeds[round][batch][k]: ``--seed`` plus the image's running index (within round 0 with --fixed_code)."""
    per_round = sum(len(b) for b in batches)
    seeds = []
    for r in range(opt.n_iter):
        first = opt.seed + (0 if opt.fixed_code else r * per_round)
        round_seeds = []
        for batch in batches:
            round_seeds.append(list(range(first, first + len(batch))))
            first += len(batch)
        seeds.append(round_seeds)
    return seeds


def run(opt: argparse.Namespace) -> list[Path]:
    config = load_config([opt.config])
    check(opt, pixel_multiple(config))
    batches = read_prompts(opt)
    check_lengths(batches, config, opt.truncate)
    device = torch.device(opt.device)
    model = load_model(config, None if opt.random_init else opt.ckpt, device, base=opt.base_weights)
    if opt.lora:
        merge_kohya(model, opt.lora, opt.lora_scale)
    if opt.channels_last:
        model.channels_last_denoiser()
    if opt.compile:
        model.compile_denoiser()
    sampler = "plms" if opt.plms else "ddim"
    outdir, sample_dir = Path(opt.outdir), Path(opt.outdir) / "samples"
    sample_dir.mkdir(parents=True, exist_ok=True)
    precision = torch.autocast(device.type) if opt.precision == "autocast" else contextlib.nullcontext()
    count, written, all_images = next_index(sample_dir), [], []
    with sampling_mode(model), precision:
        for round_seeds in tqdm(image_seeds(opt, batches), desc="rounds"):
            for prompts, seeds in zip(batches, round_seeds):
                images = txt2img(model, prompts, seeds, opt.H, opt.W, opt.ddim_steps, opt.scale, opt.ddim_eta,
                                 opt.negative_prompt, sampler)
                for prompt, seed, img in zip(prompts, seeds, images):
                    info = dict(prompt=prompt, negative_prompt=opt.negative_prompt, seed=seed, sampler=sampler,
                                steps=opt.ddim_steps, eta=opt.ddim_eta, scale=opt.scale, H=opt.H, W=opt.W,
                                index=count, ckpt=opt.ckpt, config=opt.config)
                    written.append(save_png(img, sample_dir / f"{count:05}.png", info))
                    count += 1
                all_images.append(images)
    if not opt.skip_grid:
        grid = make_grid(np.concatenate(all_images), nrow=opt.n_samples)
        written.append(save_png(grid, outdir / f"grid-{next_index(outdir, 'grid-*.png'):04}.png",
                                dict(prompt=opt.prompt if not opt.from_file else opt.from_file, seed=opt.seed)))
    return written


def sample(argv: list[str]) -> int:
    opt = parse_args(argv)
    written = run(opt)
    print(f"wrote {len(written)} images to {opt.outdir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("sample.py", sample, argv)


if __name__ == "__main__":
    sys.exit(main())
