"""A DreamBooth training step with prior preservation, ours against diffusers' train_dreambooth.py.

The same weights (diffusers' UNet, VAE and transformers' CLIP text encoder are ours, converted by
diffusers' own converters through ``ldm.export.diffusers_pipeline``), the same images and prompts,
one run, interleaved repeats. What each side's timed step is:

- ours: what main.py's Lightning loop calls for one optimizer step of ``DreamBooth``
  (``on_train_batch_start``, ``training_step``, backward, gradient clipping to norm 1 as
  ``trainer.gradient_clip_val: 1.0`` does, the AdamW step of ``configure_optimizers``,
  ``zero_grad``, ``on_train_batch_end``). Not timed: Lightning's loop itself, its logging (without a
  trainer ``self.log`` returns at once) and the data loader.
- diffusers: the step of examples/dreambooth/train_dreambooth.py rebuilt from the public classes:
  ``vae.encode(pixels).latent_dist.sample() * scaling_factor`` on instance + class images, noise,
  timesteps, ``DDPMScheduler.add_noise``, the text encoder on the token ids (tokenised by its data
  set, so not timed), one UNet forward on both halves, ``mse(instance) + prior_loss_weight *
  mse(class)``, backward, ``clip_grad_norm_(1.0)``, ``AdamW.step`` (its defaults: weight decay 1e-2),
  the constant lr scheduler's step, ``zero_grad``. The script has no latent cache.

Both sides encode the images with the VAE every step; the ``cache_latents`` row shows ours with its
cache (filled in the warm-up), which the script lacks; the ``adamw_fused`` row ours with
``model.params.optimizer=adamw_fused`` (torch's fused AdamW kernel, which the script does not use). With a frozen text encoder ours encodes each
prompt once (its cache), the script every step. The check before timing: one step on each side
from the same weights with the same draws (ours' z, t and eps handed to the script's step): losses
and updated UNet weights must agree.

    python -m benchmarks.bench_dreambooth             # mid-size model, ~3 min on an idle 2-core CPU
"""
from __future__ import annotations

import argparse
import copy
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.utils import logging as diffusers_logging
from omegaconf import OmegaConf

from benchmarks.bench_sd import MID_UNET, ROOT, randomize_, rel_err, rel_l2
from benchmarks.common import interleaved, machine_line, markdown_table
from core.cli import ArgumentParser
from core.config import instantiate_from_config
from ldm.export import diffusers_pipeline
from ldm.models.diffusion.dreambooth import DreamBooth

INSTANCE, CLASS = "a photo of sks dog", "a photo of a dog"
CLIP_NORM = 1.0  # train_dreambooth.py's --max_grad_norm default
LR = 1e-5
# the VAE of sd-v1 (4 levels: 8x down) at a quarter of its width, one ResBlock a level; the text
# encoder of sd-v1 (width 768, 12 heads, the full vocabulary) with 4 of its 12 layers
MID_VAE = dict(ch=32, ch_mult=[1, 2, 4, 4], num_res_blocks=1)
MID_TEXT = dict(width=768, layers=4, heads=12, use_checkpoint=False)
# relative error bounds of the one-step check (fp32); AdamW's first step divides each gradient by its own
# magnitude, so the update's error is that of the smallest gradients
TOLERANCE = {"vae mean": 1e-4, "loss": 1e-4, "UNet update": 1e-3}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=2, help="instance images per step (and as many class images)")
    p.add_argument("--resolution", type=int, default=256, help="image side (latents: side / 8)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per side, after a warm-up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    return p.parse_args(argv)


def db_config(resolution: int) -> dict:
    """configs/toy/dreambooth-tiny.yaml's model with the mid-size UNet, VAE and text encoder, fp32,
    no gradient checkpointing (the script's default)."""
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "toy" / "dreambooth-tiny.yaml"), resolve=True)
    params = cfg["model"]["params"]
    params["unet_config"]["params"].update(use_checkpoint=False, **MID_UNET)
    params["first_stage_config"]["params"]["ddconfig"].update(resolution=resolution, **MID_VAE)
    params["cond_stage_config"]["params"] = dict(MID_TEXT)
    params.update(image_size=resolution // 8, frozen_dtype="fp32")
    return {"model": cfg["model"]}


def build_ours(cfg: dict, seed: int, **params: Any) -> DreamBooth:
    model_cfg = copy.deepcopy(cfg["model"])
    model_cfg["params"].update(params)
    model = instantiate_from_config(model_cfg)
    randomize_(model, seed)
    model.learning_rate = LR
    return model.train()


@dataclass
class Reference:
    """The models of train_dreambooth.py, their optimizer and lr scheduler."""

    unet: Any
    vae: Any
    text_encoder: Any
    scheduler: DDPMScheduler
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    params: list[torch.nn.Parameter]
    train_text_encoder: bool


def build_reference(ours: DreamBooth, cfg: dict, train_text_encoder: bool) -> Reference:
    pipe = diffusers_pipeline(ours.state_dict(), cfg)
    unet, vae, text = pipe.unet.train(), pipe.vae.requires_grad_(False), pipe.text_encoder
    text.requires_grad_(train_text_encoder).train(train_text_encoder)
    p = cfg["model"]["params"]
    scheduler = DDPMScheduler(num_train_timesteps=p["timesteps"], beta_start=p["linear_start"],
                              beta_end=p["linear_end"], beta_schedule="scaled_linear")
    params = list(unet.parameters()) + (list(text.parameters()) if train_text_encoder else [])
    optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)  # get_scheduler("constant")
    return Reference(unet, vae, text, scheduler, optimizer, lr_scheduler, params, train_text_encoder)


def make_batch(batch: int, resolution: int, seed: int) -> dict:
    """Our data module's batch: images (B, H, W, C) in [-1, 1] and captions per half."""
    gen = torch.Generator().manual_seed(seed)
    half = lambda caption: {"image": torch.rand(batch, resolution, resolution, 3, generator=gen) * 2 - 1,  # noqa: E731
                            "caption": [caption] * batch}
    return {"instance": half(INSTANCE), "class": half(CLASS)}


def reference_inputs(ours: DreamBooth, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The script's collated batch: pixels [2B, 3, H, W] (instance, then class) and the token ids
    [2B, 77] its data set made (the same CLIP BPE)."""
    halves = (batch["instance"], batch["class"])
    pixels = torch.cat([h["image"].permute(0, 3, 1, 2) for h in halves]).contiguous()
    ids = ours.cond_stage_model.tokenize([c for h in halves for c in h["caption"]])
    return pixels, ids


# ---- the steps ----------------------------------------------------------------------------------
def ours_step(model: DreamBooth, optimizer: torch.optim.Optimizer, batch: dict) -> torch.Tensor:
    model.on_train_batch_start(batch, 0)
    loss = model.training_step(batch, 0)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], CLIP_NORM)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.on_train_batch_end(None, batch, 0)
    return loss.detach()


def reference_step(r: Reference, pixels: torch.Tensor, ids: torch.Tensor, prior_loss_weight: float,
                   draws: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """train_dreambooth.py's step with prior preservation; ``draws`` (z, t, eps) replace its own."""
    if draws is None:
        z = r.vae.encode(pixels).latent_dist.sample() * r.vae.config.scaling_factor  # (2B, 4, h, w)
        noise = torch.randn_like(z)
        t = torch.randint(0, r.scheduler.config.num_train_timesteps, (z.shape[0],), device=z.device).long()
    else:
        z, t, noise = draws
    noisy = r.scheduler.add_noise(z, noise, t)
    with torch.set_grad_enabled(r.train_text_encoder):
        context = r.text_encoder(ids, attention_mask=None, return_dict=False)[0]  # (2B, 77, D)
    pred = r.unet(noisy, t, context, return_dict=False)[0]
    pred, pred_prior = torch.chunk(pred, 2, dim=0)
    target, target_prior = torch.chunk(noise, 2, dim=0)
    prior_loss = F.mse_loss(pred_prior.float(), target_prior.float(), reduction="mean")
    loss = F.mse_loss(pred.float(), target.float(), reduction="mean") + prior_loss_weight * prior_loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(r.params, CLIP_NORM)
    r.optimizer.step()
    r.lr_scheduler.step()
    r.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


# ---- the check ----------------------------------------------------------------------------------
def recorded_draws(model: DreamBooth) -> Callable[[], list]:
    """Wrap ``model.draws`` (on the instance only) to keep each half's (z, t, eps)."""
    seen: list = []
    plain = model.draws

    def draws(part):
        seen.append(plain(part))
        return seen[-1]
    model.draws = draws
    return seen


def check_one_step(ours: DreamBooth, opt: torch.optim.Optimizer, r: Reference, batch: dict,
                   pixels: torch.Tensor, ids: torch.Tensor) -> dict[str, float]:
    """One step each from the same weights and draws: the VAE posterior means, the losses and the
    UNet weight updates (after - before, all as one vector)."""
    with torch.no_grad():
        moments = ours.first_stage_model.encode(ours.get_input(batch["instance"], "image")).mean
        ref_moments = r.vae.encode(pixels[: len(moments)]).latent_dist.mean
    ours_unet, names = dict(ours.model.diffusion_model.named_parameters()), unet_names(ours, r)
    pairs = [(ours_unet[names[k]], p) for k, p in r.unet.named_parameters()]
    before = torch.cat([p.detach().flatten() for _, p in pairs])  # equal on both sides
    seen = recorded_draws(ours)
    loss_o = ours_step(ours, opt, batch)
    del ours.draws  # back to the class's method
    draws = tuple(torch.cat(x) for x in zip(*seen))
    loss_r = reference_step(r, pixels, ids, ours.prior_loss_weight, draws)
    delta_o = torch.cat([o.detach().flatten() for o, _ in pairs]) - before
    delta_r = torch.cat([d.detach().flatten() for _, d in pairs]) - before
    return {"vae mean": rel_err(moments, ref_moments), "loss": rel_err(loss_o, loss_r),
            "UNet update": rel_l2(delta_o, delta_r)}


def unet_names(ours: DreamBooth, r: Reference) -> dict[str, str]:
    """diffusers UNet parameter name -> ours, matched by value (the converter moves tensors as is)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    prefix = "model.diffusion_model."
    state = {prefix + k: v for k, v in ours.model.diffusion_model.state_dict().items()}
    converted = convert_ldm_unet_checkpoint(state, r.unet.config)
    by_ptr = {v.data_ptr(): k.removeprefix(prefix) for k, v in state.items()}
    return {k: by_ptr[v.data_ptr()] for k, v in converted.items()}


# ---- run ----------------------------------------------------------------------------------------
def bench_case(cfg: dict, args: argparse.Namespace, train_text_encoder: bool) -> list[list[str]]:
    """Rows for one text-encoder setting: ours (one forward; two; cached latents; fused AdamW) vs the script."""
    device = torch.device("cpu")
    batch = make_batch(args.batch, args.resolution, args.seed + 1)
    variants = {"ours": {}, "ours, separate_forwards": {"separate_forwards": True},
                "ours, cache_latents": {"cache_latents": True}, "ours, adamw_fused": {"optimizer": "adamw_fused"}}
    models = {name: build_ours(cfg, args.seed, train_text_encoder=train_text_encoder, **p)
              for name, p in variants.items()}
    optimizers = {name: m.configure_optimizers() for name, m in models.items()}
    ref = build_reference(models["ours"], cfg, train_text_encoder)
    pixels, ids = reference_inputs(models["ours"], batch)
    errors = check_one_step(models["ours"], optimizers["ours"], ref, batch, pixels, ids)
    bad = {k: v for k, v in errors.items() if v > TOLERANCE[k]}
    if bad:
        raise SystemExit(f"bench_dreambooth: the sides differ ({bad}): not the same computation")
    sides = {name: (lambda m=m, o=optimizers[name]: ours_step(m, o, batch)) for name, m in models.items()}
    sides["diffusers"] = lambda: reference_step(ref, pixels, ids, 1.0)
    timings = interleaved(sides, device, warmup=1, repeats=args.repeats)
    ref_s = timings["diffusers"].median
    text = "text encoder trained" if train_text_encoder else "text encoder frozen"
    agree = ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
    rows = [[text, name, f"{t.median:.3f}", f"{t.median / ref_s:.2f}", agree if name == "ours" else ""]
            for name, t in timings.items()]
    raw = "; ".join(f"{k} " + " ".join(f"{v:.3f}" for v in t.seconds) for k, t in timings.items())
    print(f"# {text}: seconds per step: {raw}; {machine_line(device)}", flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    diffusers_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", ".*self.log.*")  # no trainer: our training_step's log is a no-op
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = db_config(args.resolution)
    latent = args.resolution // 8
    print(f"# DreamBooth step, {args.batch} instance + {args.batch} class images at {args.resolution} px "
          f"({latent}x{latent} latents), mid-size UNet / VAE / 4-layer CLIP text encoder, fp32, AdamW, "
          f"clip 1.0; {machine_line(torch.device('cpu'))}", flush=True)
    rows = bench_case(cfg, args, True) + bench_case(cfg, args, False)
    print(markdown_table(["case", "side", "s / step", "vs diffusers", "one-step agreement"], rows))
    print(f"# finished; {machine_line(torch.device('cpu'))}")


if __name__ == "__main__":
    main(sys.argv[1:])
