"""Text-to-image sampling with a Stable Diffusion v1 checkpoint (the CompVis txt2img conventions).

    python scripts/sample.py --prompt "a photograph of an astronaut riding a horse" \
        --ckpt models/ldm/stable-diffusion-v1/model.ckpt --plms
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.weights import CheckpointError  # noqa: E402
from ldm.loading import latent_factor, load_model  # noqa: E402
from core.config import load_config  # noqa: E402
from core.images import make_grid, next_index, save_png, to_uint8  # noqa: E402
from ldm.models.diffusion.ddim import DDIMSampler  # noqa: E402
from ldm.models.diffusion.plms import PLMSSampler  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", default="a painting of a virus monster playing guitar")
    p.add_argument("--from-file", dest="from_file", help="one prompt per line (overrides --prompt)")
    p.add_argument("--negative_prompt", default="", help="the unconditional prompt of the guidance")
    p.add_argument("--ckpt", default="models/ldm/stable-diffusion-v1/model.ckpt")
    p.add_argument("--config", default="configs/v1-inference.yaml")
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
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--fixed_code", action="store_true", help="the same starting noise in every round")
    p.add_argument("--precision", choices=["full", "autocast"], default="autocast")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip_grid", action="store_true")
    return p.parse_args(argv)


def read_prompts(opt: argparse.Namespace) -> list[list[str]]:
    """Batches of ``n_samples`` prompts: one prompt repeated, or the file's lines in chunks."""
    if not opt.from_file:
        return [[opt.prompt] * opt.n_samples]
    path = Path(opt.from_file)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prompt file not found")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"{path}: no prompts in the file")
    return [lines[i:i + opt.n_samples] for i in range(0, len(lines), opt.n_samples)]


def check(opt: argparse.Namespace, factor: int) -> None:
    for name in ("H", "W"):
        if getattr(opt, name) % factor:
            raise ValueError(f"--{name} {getattr(opt, name)} must be a multiple of {factor}")
    if opt.plms and opt.ddim_eta != 0:
        raise ValueError("--plms is deterministic: --ddim_eta must be 0")


def run(opt: argparse.Namespace) -> list[Path]:
    config = load_config([opt.config])
    factor = latent_factor(config)
    check(opt, factor)
    device = torch.device(opt.device)
    model = load_model(config, None if opt.random_init else opt.ckpt, device)
    sampler = (PLMSSampler if opt.plms else DDIMSampler)(model)
    outdir, sample_dir = Path(opt.outdir), Path(opt.outdir) / "samples"
    sample_dir.mkdir(parents=True, exist_ok=True)
    shape = (model.channels, opt.H // factor, opt.W // factor)
    gen = torch.Generator(device).manual_seed(opt.seed)
    start_code = torch.randn((opt.n_samples, *shape), generator=gen, device=device) if opt.fixed_code else None
    precision = torch.autocast(device.type) if opt.precision == "autocast" else contextlib.nullcontext()
    count, written, all_images = next_index(sample_dir), [], []
    with torch.no_grad(), precision, model.ema_scope():
        for _ in tqdm(range(opt.n_iter), desc="rounds"):
            for prompts in read_prompts(opt):
                n = len(prompts)
                uc = model.get_learned_conditioning([opt.negative_prompt] * n) if opt.scale != 1.0 else None
                c = model.get_learned_conditioning(prompts)
                x_T = start_code[:n] if start_code is not None else None
                z, _ = sampler.sample(S=opt.ddim_steps, batch_size=n, shape=shape, conditioning=c,
                                      unconditional_guidance_scale=opt.scale, unconditional_conditioning=uc,
                                      eta=opt.ddim_eta, x_T=x_T, generator=gen, verbose=False)
                images = to_uint8(model.decode_first_stage(z))
                for prompt, img in zip(prompts, images):
                    info = dict(prompt=prompt, negative_prompt=opt.negative_prompt, seed=opt.seed,
                                sampler=sampler.name, steps=opt.ddim_steps, eta=opt.ddim_eta, scale=opt.scale,
                                H=opt.H, W=opt.W, index=count, ckpt=opt.ckpt, config=opt.config)
                    written.append(save_png(img, sample_dir / f"{count:05}.png", info))
                    count += 1
                all_images.append(images)
    if not opt.skip_grid:
        grid = make_grid(np.concatenate(all_images), nrow=opt.n_samples)
        written.append(save_png(grid, outdir / f"grid-{next_index(outdir, 'grid-*.png'):04}.png",
                                dict(prompt=opt.prompt if not opt.from_file else opt.from_file, seed=opt.seed)))
    return written


def main(argv: list[str] | None = None) -> int:
    opt = parse_args(argv)
    try:
        written = run(opt)
    except (CheckpointError, FileNotFoundError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} images to {opt.outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
