"""Stable Diffusion v1, ours against diffusers: the same UNet weights, the same inputs, one run.

Measures (1) a UNet training step (forward + backward of the eps MSE loss), (2) a DDIM + CFG
sampling run in latent space (no VAE decode on either side): our ``DDIMSampler`` over
``LatentDiffusion.apply_model`` against diffusers' ``UNet2DConditionModel`` in the CFG loop of its
pipelines with a ``DDIMScheduler`` configured as CompVis (leading spacing, steps_offset 1,
set_alpha_to_one False), and (3) the same with our ``PLMSSampler`` against diffusers'
``PNDMScheduler(skip_prk_steps=True)`` (both evaluate the UNet steps + 1 times). diffusers' weights are ours, converted by diffusers' own converter. The
sides must agree: one float32 forward before anything is timed (at the parity bound), then the timed
runs' loss, gradients and final latents (reported in the table; a mismatch ends with an error).

    python -m benchmarks.bench_sd                          # mid-size model: ~2 min on an idle 2-core CPU
    python -m benchmarks.bench_sd --full --device cuda --dtype bf16   # sd-v1 at 512x512
    python -m benchmarks.bench_sd --compile --only ddim   # both sides through torch.compile
    python -m benchmarks.bench_sd --channels_last         # both UNets in channels-last memory order
    python -m benchmarks.bench_sd --compile --only forward --repeats 10   # one compiled UNet call
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, PNDMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm
from diffusers.utils import logging as diffusers_logging
from omegaconf import OmegaConf

from benchmarks.common import DTYPES, Timing, interleaved, machine_line, markdown_table, paired_ratio
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.models.diffusion.ddpm import LatentDiffusion
from core.cli import ArgumentParser
from core.config import instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "model.diffusion_model."
GUIDANCE = 7.5
BENCHES = ("train", "ddim", "plms", "forward")
# The mid-size UNet: sd-v1's architecture (attention at every level, 2 ResBlocks a level, CLIP-L
# context) at a fifth of its width, three levels instead of four, and head widths 32-64 (sd-v1: 40-160).
MID_UNET = dict(model_channels=64, channel_mult=[1, 2, 2], attention_resolutions=[4, 2, 1],
                num_res_blocks=2, num_heads=2, context_dim=768)
# Agreement bounds (relative error, max |ours - ref| / max |ref|) per compute dtype. In reduced
# precision the sides round differently (ours normalises in float32, as CompVis does), so there the
# bound only catches a different computation; the float32 forward check before the cast is the tight one.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2.5e-1, torch.float16: 2.5e-1}
# A static loss scale for float16 training (as a GradScaler would apply): without it the small
# gradients underflow.
LOSS_SCALE = {torch.float32: 1.0, torch.bfloat16: 1.0, torch.float16: 2.0**10}


@dataclasses.dataclass(frozen=True)
class Setup:
    """The compared models, their shared inputs and the benchmark's sizes."""

    ours: LatentDiffusion
    ref: UNet2DConditionModel
    x: torch.Tensor  # [B, 4, h, w] latents: x_t for training, x_T for sampling
    noise: torch.Tensor  # [B, 4, h, w] the training target eps
    t: torch.Tensor  # [B] training timesteps
    context: torch.Tensor  # [B, 77, D] conditional context
    uncontext: torch.Tensor  # [B, 77, D] unconditional context
    steps: int


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="full-size sd-v1 UNet at 512x512 (64x64 latents)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per side, after a warm-up")
    p.add_argument("--batch", type=int, default=2, help="latent batch size (CFG doubles it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--only", default="train,ddim,plms",
                   help="comma-separated subset of train, ddim, plms, forward (one CFG-batch UNet call, no grad)")
    p.add_argument("--channels_last", action="store_true",
                   help="both UNets' convolution weights in channels-last order (ours: model.params.channels_last)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile both UNets in place (ours: model.params.compile); built in the warm-up")
    args = p.parse_args(argv)
    args.only = [w.strip() for w in args.only.split(",") if w.strip()]
    unknown = sorted(set(args.only) - set(BENCHES))
    if unknown or not args.only:
        p.error(f"--only: expected names among {', '.join(BENCHES)}, got {unknown or 'none'}")
    return args


def model_config(full: bool) -> dict:
    """Our LatentDiffusion config: the UNet of v1-inference.yaml (or the mid-size one), without
    gradient checkpointing (diffusers' default) and with identity first and cond stages, since both
    sides work on given latents and contexts."""
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "v1-inference.yaml"), resolve=True)
    unet = cfg["model"]["params"]["unet_config"]["params"]
    unet.update(use_checkpoint=False, **({} if full else MID_UNET))
    return cfg


def build_ours(cfg: dict, device: torch.device, seed: int) -> LatentDiffusion:
    params = copy.deepcopy(cfg["model"]["params"])
    params.update(first_stage_config={"target": "torch.nn.Identity"},
                  cond_stage_config={"target": "torch.nn.Identity"})
    with torch.device(device):
        model = instantiate_from_config({"target": cfg["model"]["target"], "params": params})
    randomize_(model.model, seed)
    return model.eval()


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (zero-initialised output layers would make the comparison vacuous),
    at a scale that keeps activations sane: weights N(0, 1/fan_in), biases N(0, 0.02^2), norm
    weights 1 + N(0, 0.1^2)."""
    gen = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    for name, p in sorted(module.named_parameters()):
        if p.ndim > 1:
            p.normal_(0.0, p[0].numel() ** -0.5, generator=gen)
        elif "norm" in name and name.endswith("weight"):
            p.normal_(1.0, 0.1, generator=gen)
        else:
            p.normal_(0.0, 0.02, generator=gen)
    return module


def build_reference(ours: LatentDiffusion, cfg: dict) -> tuple[UNet2DConditionModel, dict[str, str]]:
    """diffusers' UNet from its own config mapping and converter, strictly loaded with our weights;
    and the map diffusers parameter name -> our parameter name (the converter moves tensors as is)."""
    state = {PREFIX + k: v for k, v in ours.model.diffusion_model.state_dict().items()}
    config = create_unet_diffusers_config_from_ldm(cfg, state)
    converted = convert_ldm_unet_checkpoint(state, config)
    if len(converted) != len(state):
        raise RuntimeError(f"diffusers' converter mapped {len(converted)} of {len(state)} UNet keys")
    device = next(ours.parameters()).device
    with torch.device(device):
        ref = UNet2DConditionModel(**config)
    ref.load_state_dict(converted, strict=True)
    ours_by_ptr = {v.data_ptr(): k.removeprefix(PREFIX) for k, v in state.items()}
    return ref.eval(), {k: ours_by_ptr[v.data_ptr()] for k, v in converted.items()}


def make_setup(args: argparse.Namespace, device: torch.device) -> tuple[Setup, dict[str, str]]:
    cfg = model_config(args.full)
    ours = build_ours(cfg, device, args.seed)
    ref, names = build_reference(ours, cfg)
    unet = cfg["model"]["params"]["unet_config"]["params"]
    size, batch = 64 if args.full else 32, args.batch
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    rand = lambda *shape: torch.randn(*shape, generator=gen, device=device)  # noqa: E731
    setup = Setup(ours=ours, ref=ref, x=rand(batch, 4, size, size), noise=rand(batch, 4, size, size),
                  t=torch.randint(0, 1000, (batch,), generator=gen, device=device),
                  context=rand(batch, 77, unet["context_dim"]), uncontext=rand(batch, 77, unet["context_dim"]),
                  steps=args.steps)
    return setup, names


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|, in float64."""
    ours, ref = ours.detach().double(), ref.detach().double()
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def rel_l2(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """||ours - ref|| / ||ref||, in float64: for all gradients as one vector, since in reduced
    precision the small ones underflow differently."""
    ours, ref = ours.detach().double(), ref.detach().double()
    return ((ours - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def check(what: str, err: float, tol: float) -> None:
    if err > tol:
        raise SystemExit(f"bench_sd: {what} differ, relative error {err:.2e} > {tol:.0e}: not the same computation")


@torch.no_grad()
def check_forward(s: Setup) -> float:
    """One eps prediction on both sides, in float32 before the cast."""
    ours = s.ours.apply_model(s.x, s.t, s.context)
    ref = s.ref(s.x, s.t, encoder_hidden_states=s.context).sample
    err = rel_err(ours, ref)
    check("fp32 UNet outputs", err, TOLERANCE[torch.float32])
    return err


# ---- (1) training step --------------------------------------------------------------------------
def train_step(unet: Callable[[], torch.Tensor], params: list[torch.nn.Parameter],
               noise: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """loss = mse(eps_theta(x_t, t, c), eps); backward of the scaled loss; returns the loss and the
    gradients (times the loss scale)."""
    for p in params:
        p.grad = None
    loss = F.mse_loss(unet().float(), noise.float())
    (loss * LOSS_SCALE[noise.dtype]).backward()
    return loss.detach(), {id(p): p.grad for p in params}


def bench_train(s: Setup, names: dict[str, str], device: torch.device, repeats: int) -> tuple[dict, dict]:
    ours_net, ref = s.ours.model.diffusion_model.train(), s.ref.train()
    sides = {
        "ours": lambda: train_step(lambda: ours_net(s.x, s.t, s.context), list(ours_net.parameters()), s.noise),
        "diffusers": lambda: train_step(lambda: ref(s.x, s.t, encoder_hidden_states=s.context).sample,
                                        list(ref.parameters()), s.noise),
    }
    timings = interleaved(sides, device, warmup=1, repeats=repeats)
    (loss_o, grads_o), (loss_d, grads_d) = timings["ours"].result, timings["diffusers"].result
    ours_params = dict(ours_net.named_parameters())
    pairs = [(grads_o[id(ours_params[names[k]])], grads_d[id(p)]) for k, p in ref.named_parameters()]
    grad_err = rel_l2(torch.cat([o.flatten() for o, _ in pairs]), torch.cat([d.flatten() for _, d in pairs]))
    ours_net.eval(), ref.eval()
    return timings, {"loss": rel_err(loss_o, loss_d), "grads": grad_err}


# ---- (2) DDIM + CFG sampling --------------------------------------------------------------------
def sample_ours(s: Setup, steps: int, sampler: type = DDIMSampler) -> torch.Tensor:
    x_T = s.x
    samples, _ = sampler(s.ours).sample(S=steps, batch_size=x_T.shape[0], shape=tuple(x_T.shape[1:]),
                                        conditioning=s.context, unconditional_guidance_scale=GUIDANCE,
                                        unconditional_conditioning=s.uncontext, eta=0.0, x_T=x_T, verbose=False)
    return samples


COMPVIS_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        set_alpha_to_one=False, steps_offset=1)


def compvis_ddim() -> DDIMScheduler:
    return DDIMScheduler(clip_sample=False, timestep_spacing="leading", **COMPVIS_SCHEDULE)


def compvis_pndm() -> PNDMScheduler:
    return PNDMScheduler(skip_prk_steps=True, timestep_spacing="leading", **COMPVIS_SCHEDULE)


def sample_diffusers(s: Setup, steps: int, make_scheduler: Callable = compvis_ddim) -> torch.Tensor:
    """The denoising loop of diffusers' StableDiffusionPipeline, latents in and out."""
    scheduler = make_scheduler()
    scheduler.set_timesteps(steps, device=s.x.device)
    embeds = torch.cat([s.uncontext, s.context])  # [2B, 77, D]
    latents = s.x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)  # [2B, 4, h, w]
        e_u, e_c = s.ref(x_in, t, encoder_hidden_states=embeds).sample.chunk(2)
        latents = scheduler.step(e_u + GUIDANCE * (e_c - e_u), t, latents).prev_sample
    return latents


@torch.no_grad()
def bench_sampling(s: Setup, device: torch.device, repeats: int, sampler: type = DDIMSampler,
                   make_scheduler: Callable = compvis_ddim) -> tuple[dict, dict]:
    sample_ours(s, 2, sampler), sample_diffusers(s, 2, make_scheduler)  # warm-up: a short run each
    sides = {"ours": lambda: sample_ours(s, s.steps, sampler),
             "diffusers": lambda: sample_diffusers(s, s.steps, make_scheduler)}
    timings = interleaved(sides, device, warmup=0, repeats=repeats)
    return timings, {"latents": rel_err(timings["ours"].result, timings["diffusers"].result)}


# ---- (4) one UNet call of a sampling step --------------------------------------------------------
@torch.no_grad()
def bench_forward(s: Setup, device: torch.device, repeats: int) -> tuple[dict, dict]:
    """eps of a CFG batch ([x, x] with [uncond, cond] contexts) in one UNet call on each side."""
    x, t, c = torch.cat([s.x, s.x]), torch.cat([s.t, s.t]), torch.cat([s.uncontext, s.context])
    unet = s.ours.model.diffusion_model  # compiled in place with --compile
    sides = {"ours": lambda: unet(x, t, c), "diffusers": lambda: s.ref(x, t, encoder_hidden_states=c).sample}
    timings = interleaved(sides, device, warmup=1, repeats=repeats)
    return timings, {"eps": rel_err(timings["ours"].result, timings["diffusers"].result)}


# ---- report -------------------------------------------------------------------------------------
def row(config: str, timings: dict[str, Timing], errors: dict[str, float], per_run: int,
        device: torch.device) -> list[str]:
    ours, ref = timings["ours"].median, timings["diffusers"].median
    cells = [config, f"{ours:.3f}", f"{ref:.3f}", f"{ours / ref:.2f}",
             f"{per_run / ours:.2f} / {per_run / ref:.2f}"]
    if device.type == "cuda":
        cells.append(" / ".join(f"{timings[k].peak_bytes / 2**30:.2f}" for k in ("ours", "diffusers")))
    return cells + [", ".join(f"{k} {v:.1e}" for k, v in errors.items())]


def raw(timing: Timing) -> str:
    return " ".join(f"{v:.3f}" for v in timing.seconds)


def describe(s: Setup, args: argparse.Namespace) -> str:
    unet = s.ours.model.diffusion_model
    n_params = sum(p.numel() for p in unet.parameters()) / 1e6
    size = "sd-v1" if args.full else f"mid ({MID_UNET['model_channels']} ch x {MID_UNET['channel_mult']})"
    return f"{size} UNet, {n_params:.0f}M params, {args.dtype}{', torch.compile' if args.compile else ''}{', channels_last' if args.channels_last else ''}"


def cast(s: Setup, dtype: torch.dtype) -> Setup:
    """The networks and inputs in the compute dtype; the schedules stay in float32."""
    s.ours.model.to(dtype), s.ref.to(dtype)
    return dataclasses.replace(s, x=s.x.to(dtype), noise=s.noise.to(dtype), context=s.context.to(dtype),
                               uncontext=s.uncontext.to(dtype))


def report(s: Setup, device: torch.device, results: dict[str, tuple[dict, dict]]) -> None:
    batch, size = s.x.shape[0], s.x.shape[-1]
    header = ["config", "ours (s)", "diffusers (s)", "ours/diffusers", "it/s ours / diffusers"]
    header += ["peak GiB over held, ours / diffusers"] if device.type == "cuda" else []
    names = {"train": f"UNet fwd+bwd, batch {batch}, {size}x{size} latents, 77x{s.context.shape[-1]} context",
             "ddim": f"DDIM {s.steps} steps + CFG {GUIDANCE}, batch {batch} (x2), {size}x{size} latents",
             "plms": f"PLMS {s.steps} steps + CFG {GUIDANCE}, batch {batch} (x2), {size}x{size} latents",
             "forward": f"UNet forward (no grad), batch {batch} (x2 for CFG), {size}x{size} latents"}
    rows = [row(names[k], *v, s.steps if k in ("ddim", "plms") else 1, device) for k, v in results.items()]
    print(markdown_table(header + ["rel. error"], rows))
    for name, (timings, _) in results.items():
        print(f"# {name} seconds per repeat: " + "; ".join(f"{k} {raw(t)}" for k, t in timings.items())
              + f"; ours / diffusers within a round, median {paired_ratio(timings['ours'], timings['diffusers']):.2f}")
    print(f"# finished; {machine_line(device)}")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32
    diffusers_logging.set_verbosity_error()  # its advice on casting with .to() is beside the point here
    if args.threads:
        torch.set_num_threads(args.threads)
    s, names = make_setup(args, device)
    fp32_err = check_forward(s)
    s = cast(s, dtype)
    if args.channels_last:
        s.ours.channels_last_denoiser()
        s.ref.to(memory_format=torch.channels_last)
    if args.compile:
        s.ours.compile_denoiser()
        s.ref.compile()
    print(f"# {describe(s, args)}; {machine_line(device)}; fp32 forward parity {fp32_err:.1e}", flush=True)
    runs = {"train": lambda: bench_train(s, names, device, args.repeats),
            "ddim": lambda: bench_sampling(s, device, args.repeats),
            "plms": lambda: bench_sampling(s, device, args.repeats, PLMSSampler, compvis_pndm),
            "forward": lambda: bench_forward(s, device, args.repeats)}
    results = {name: runs[name]() for name in args.only}
    report(s, device, results)
    for name, (_, errors) in results.items():
        for what, err in errors.items():
            check(f"{args.dtype} {name} {what}", err, TOLERANCE[dtype])


if __name__ == "__main__":
    main(sys.argv[1:])
