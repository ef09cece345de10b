"""The side-by-side workloads that ``benchmarks/scaling.py`` and ``benchmarks/gpu.py`` run, each as a
pair of zero-argument calls (ours, the reference) on the same weights and inputs.

Stable Diffusion v1 (models from ``benchmarks/bench_sd.py``: ours, and diffusers' UNet with our
weights through diffusers' converter):

- sampling: ``bench_sd``'s DDIM + CFG loops (ours ``DDIMSampler``, diffusers' pipeline loop);
- the DreamBooth step with prior preservation on given latents (``cache_latents``) and a frozen
  text encoder (given contexts): the batch is n instance then n class latents, one UNet forward on
  all of them, L = L_instance + ``PRIOR_LOSS_WEIGHT`` L_class, backward, AdamW step. Ours through
  ``LatentDiffusion.q_sample`` / ``apply_model`` / ``eps_loss`` (what ``DreamBooth.denoising_losses``
  calls), diffusers' as ``train_dreambooth.py`` (``DDPMScheduler.add_noise``, ``chunk(2)``, MSE).
  The AdamW step runs at lr 0, so both sides keep equal weights over any number of repeats.

BLIP-2 OPT (``bench_blip2``'s layout; transformers' random model saved to a folder that both load):

- captioning: beam search, ``min_new_tokens = max_new_tokens`` (``bench_blip2.run_ref``);
- the caption fine-tuning step on given token ids: LM loss of the text after the visual prompt
  (ours ``blip2.losses.caption_lm.opt_lm_loss``, transformers' ``labels=``), the ViT and OPT
  frozen, the Q-Former, queries and projection trained (stage 2), backward, AdamW step at lr 0.

Sizes: ``tiny`` (seconds, for tests), ``mid`` (bench_sd / bench_blip2's CPU sizes), ``full`` (sd-v1,
opt-2.7b).
"""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from transformers import Blip2Config, Blip2ForConditionalGeneration
from transformers.utils import logging as transformers_logging

from benchmarks import bench_blip2, bench_sd
from blip2 import Blip2OPT
from blip2.losses.caption_lm import IGNORE_INDEX, opt_lm_loss

SIZES = ("tiny", "mid", "full")
PRIOR_LOSS_WEIGHT = 1.0
TINY_UNET = dict(model_channels=32, channel_mult=[1, 2], attention_resolutions=[2, 1], num_res_blocks=1,
                 num_heads=2, context_dim=64)
TINY_BLIP2 = dict(
    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       image_size=28, patch_size=14),
    qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        encoder_hidden_size=32),
    text_config=dict(model_type="opt", vocab_size=50304, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                     num_attention_heads=2, word_embed_proj_dim=32),
)
BLIP2_SIZES = {"tiny": TINY_BLIP2, "mid": bench_blip2.MID, "full": bench_blip2.FULL}
TEXT_TOKENS = 16  # fine-tuning: caption ids per image (bos first)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- Stable Diffusion ---------------------------------------------------------------------------
@dataclasses.dataclass
class SDModels:
    ours: Any  # LatentDiffusion (identity first and cond stages)
    ref: Any  # diffusers UNet2DConditionModel with our weights
    names: dict[str, str]  # diffusers parameter name -> ours
    context_dim: int


def sd_config(size: str) -> dict:
    cfg = bench_sd.model_config(size == "full")
    if size == "tiny":
        cfg["model"]["params"]["unet_config"]["params"].update(TINY_UNET)
    return cfg


def sd_models(size: str, device: torch.device, seed: int = 0) -> SDModels:
    cfg = sd_config(size)
    ours = bench_sd.build_ours(cfg, device, seed)
    ref, names = bench_sd.build_reference(ours, cfg)
    return SDModels(ours, ref, names, cfg["model"]["params"]["unet_config"]["params"]["context_dim"])


def sd_inputs(m: SDModels, batch: int, latent: int, steps: int, seed: int = 1,
              dtype: torch.dtype = torch.float32) -> bench_sd.Setup:
    """bench_sd's inputs: x [B, 4, h, w], eps, t, contexts [B, 77, D] (cond, uncond)."""
    device = next(m.ours.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, device=device).to(dtype)  # noqa: E731
    return bench_sd.Setup(ours=m.ours, ref=m.ref, x=rand(batch, 4, latent, latent),
                          noise=rand(batch, 4, latent, latent),
                          t=torch.randint(0, 1000, (batch,), generator=gen, device=device),
                          context=rand(batch, 77, m.context_dim), uncontext=rand(batch, 77, m.context_dim),
                          steps=steps)


def sampling_pair(s: bench_sd.Setup) -> dict[str, Callable[[], torch.Tensor]]:
    run = torch.no_grad()
    return {"ours": run(lambda: bench_sd.sample_ours(s, s.steps)),
            "ref": run(lambda: bench_sd.sample_diffusers(s, s.steps))}


def dreambooth_loss_ours(s: bench_sd.Setup) -> torch.Tensor:
    """DreamBooth Eq. 2 through our model: first half instance, second half class."""
    model = s.ours
    eps = model.apply_model(model.q_sample(s.x, s.t, s.noise), s.t, s.context)  # (2n, 4, h, w)
    n = s.x.shape[0] // 2
    halves = zip(eps.split(n), s.noise.split(n), s.t.split(n))
    loss_instance, loss_class = [model.eps_loss(*half)[0] for half in halves]
    return loss_instance + PRIOR_LOSS_WEIGHT * loss_class


def dreambooth_loss_ref(s: bench_sd.Setup, scheduler: DDPMScheduler) -> torch.Tensor:
    """The loss of diffusers' train_dreambooth.py with prior preservation."""
    noisy = scheduler.add_noise(s.x, s.noise, s.t)
    pred, pred_prior = s.ref(noisy, s.t, encoder_hidden_states=s.context).sample.chunk(2)
    target, target_prior = s.noise.chunk(2)
    loss = F.mse_loss(pred.float(), target.float())
    return loss + PRIOR_LOSS_WEIGHT * F.mse_loss(pred_prior.float(), target_prior.float())


def sd_v1_ddpm() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear")


@dataclasses.dataclass
class TrainStep:
    """loss(), backward of the scaled loss and an AdamW step at lr 0 over ``params``; returns the
    loss and the gradients (times ``loss_scale``) by parameter name."""

    loss: Callable[[], torch.Tensor]
    params: dict[str, torch.nn.Parameter]
    autocast: torch.dtype | None = None
    loss_scale: float = 1.0

    def __post_init__(self) -> None:
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=0.0)

    def __call__(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.optimizer.zero_grad(set_to_none=True)
        device = next(iter(self.params.values())).device
        with torch.autocast(device.type, dtype=self.autocast, enabled=self.autocast is not None):
            loss = self.loss()
        (loss * self.loss_scale).backward()
        grads = {k: p.grad for k, p in self.params.items()}
        self.optimizer.step()
        return loss.detach(), grads


def dreambooth_pair(s: bench_sd.Setup, m: SDModels, autocast: torch.dtype | None = None,
                    loss_scale: float = 1.0) -> dict[str, TrainStep]:
    """Both steps, the gradients named by our parameter names. ``s.x``: 2n latents."""
    if s.x.shape[0] % 2:
        raise ValueError(f"dreambooth step: expected n instance + n class latents, got a batch of {s.x.shape[0]}")
    ours_net, scheduler = m.ours.model.diffusion_model.train(), sd_v1_ddpm()
    m.ref.train()
    ours_params = dict(ours_net.named_parameters())
    ref_params = {m.names[k]: p for k, p in m.ref.named_parameters()}
    return {"ours": TrainStep(lambda: dreambooth_loss_ours(s), ours_params, autocast, loss_scale),
            "ref": TrainStep(lambda: dreambooth_loss_ref(s, scheduler), ref_params, autocast, loss_scale)}


# ---- BLIP-2 -------------------------------------------------------------------------------------
def blip2_models(size: str, device: torch.device, dtype: torch.dtype = torch.float32,
                 seed: int = 0) -> tuple[Blip2OPT, Blip2ForConditionalGeneration]:
    """transformers' random model (bench_blip2's sizes, or TINY_BLIP2; random queries) saved to a
    temporary folder; ours and transformers load it (both keep the Q-Former in fp32).
    bench_blip2.save_reference knows only its two sizes and zero queries, hence this small variant."""
    config = Blip2Config(**BLIP2_SIZES[size], num_query_tokens=8 if size == "tiny" else 32,
                         image_token_index=bench_blip2.IMAGE_TOKEN)
    torch.manual_seed(seed)
    transformers_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="workloads_blip2_") as tmp:
        with torch.device(device):
            model = Blip2ForConditionalGeneration(config)
        with torch.no_grad():  # transformers starts them at 0: LayerNorm of constant rows, huge gradients
            model.query_tokens.normal_(0.0, 0.02)
        model.to(dtype).save_pretrained(tmp)
        del model
        ours = Blip2OPT.from_pretrained(Path(tmp), dtype=dtype, device=device)
        ref = Blip2ForConditionalGeneration.from_pretrained(tmp, dtype=dtype).to(device).eval()
    return ours, ref


def blip2_pixels(ours: Blip2OPT, batch: int, seed: int = 1) -> torch.Tensor:
    device, dtype = ours.query_tokens.device, ours.language_projection.weight.dtype
    gen = torch.Generator(device=device).manual_seed(seed)
    size = ours.image_size
    return torch.randn(batch, 3, size, size, generator=gen, device=device).to(dtype)


def caption_pair(ours: Blip2OPT, ref: Blip2ForConditionalGeneration, pixels: torch.Tensor, beams: int,
                 new_tokens: int) -> dict[str, Callable[[], torch.Tensor]]:
    """Beam-search captions of ``pixels``: the new token ids [B, new_tokens] of each side."""
    options = dict(num_beams=beams, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   eos_token_id=bench_blip2.NEWLINE)
    s = bench_blip2.Setup(ours, ref, pixels, options)
    return {"ours": torch.no_grad()(lambda: ours.generate_ids(pixels, **options)),
            "ref": lambda: bench_blip2.run_ref(s)}


def caption_ids(pixels: torch.Tensor, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Random caption ids [B, T] (bos first, no <image> id) and their labels (-100 on the bos)."""
    gen = torch.Generator(device=pixels.device).manual_seed(seed)
    ids = torch.randint(3, bench_blip2.IMAGE_TOKEN, (pixels.shape[0], TEXT_TOKENS), generator=gen,
                        device=pixels.device)
    ids[:, 0] = 2
    return ids, ids.masked_fill(torch.arange(TEXT_TOKENS, device=ids.device) == 0, IGNORE_INDEX)


def stage2_trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Freeze the ViT and OPT; the Q-Former, queries and projection train. Same names on both sides."""
    model.requires_grad_(False)
    for part in (model.qformer, model.language_projection):
        part.requires_grad_(True)
    model.query_tokens.requires_grad_(True)
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


def finetune_pair(ours: Blip2OPT, ref: Blip2ForConditionalGeneration, pixels: torch.Tensor,
                  autocast: torch.dtype | None = None) -> dict[str, TrainStep]:
    ids, labels = caption_ids(pixels)
    q = ours.query_tokens.shape[1]
    image_ids = ids.new_full((ids.shape[0], q), bench_blip2.IMAGE_TOKEN)
    ref_ids = torch.cat([image_ids, ids], 1)  # transformers: Q <image> ids in front of the text
    ref_labels = torch.cat([torch.full_like(image_ids, IGNORE_INDEX), labels], 1)

    def loss_ours() -> torch.Tensor:
        return opt_lm_loss(ours.text_logits(pixels, ids), labels)

    def loss_ref() -> torch.Tensor:
        return ref(pixel_values=pixels, input_ids=ref_ids, labels=ref_labels).loss

    return {"ours": TrainStep(loss_ours, stage2_trainable(ours), autocast),
            "ref": TrainStep(loss_ref, stage2_trainable(ref), autocast)}


# ---- agreement ----------------------------------------------------------------------------------
def train_agreement(ours: tuple[torch.Tensor, dict], ref: tuple[torch.Tensor, dict]) -> dict[str, float]:
    """Relative errors of the loss (max) and of all gradients as one vector (L2)."""
    (loss_o, grads_o), (loss_r, grads_r) = ours, ref
    if grads_o.keys() != grads_r.keys():
        raise RuntimeError(f"train step: the sides train different parameters "
                           f"({sorted(grads_o.keys() ^ grads_r.keys())[:3]} ...)")
    names = sorted(grads_o)
    flat = lambda grads: torch.cat([grads[k].flatten().float() for k in names])  # noqa: E731
    return {"loss": bench_sd.rel_err(loss_o, loss_r), "grads": bench_sd.rel_l2(flat(grads_o), flat(grads_r))}


def equal_rows(ours: torch.Tensor, ref: torch.Tensor) -> str:
    same = (ours.cpu() == ref.cpu()).all(dim=1).sum().item()
    return f"{same}/{ours.shape[0]} captions equal"
