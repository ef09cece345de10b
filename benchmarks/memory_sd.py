"""Peak memory of one full-size sd-v1 DreamBooth training step at 512x512, ours against diffusers.

The step: a batch of 1 instance + 1 class image (2 through the text encoder and the UNet); the frozen
VAE encodes the images, eps-loss of both halves, instance + prior loss, backward, optimizer step.
Ours is our ``DreamBooth`` built from ``configs/dreambooth.yaml`` running its own ``training_step``
and ``configure_optimizers``, its frozen weights cast to the autocast dtype under mixed precision
(``frozen_dtype``, as diffusers' ``weight_dtype``; fp32 rows: fp32). The reference is diffusers'
``UNet2DConditionModel`` (sd-v1 config) + transformers' ``CLIPTextModel`` (ViT-L/14 text) +
diffusers' ``AutoencoderKL``, built from configs (no download), doing the step of diffusers'
``train_dreambooth.py`` / ``train_dreambooth_lora.py``
(one concatenated forward; frozen models stored in the mixed-precision dtype, trained ones in
float32, LoRA adapters through peft in float32) with the same optimizer class and settings.

A row: what trains (``unet``, ``unet+te``, ``lora4``, ``lora16``: LoRA ranks 4 and 16 on the default
targets, the attention projections), the precision (``fp32``, ``16-mixed``, ``bf16-mixed``),
gradient checkpointing (``ckpt`` or ``nockpt``) and the optimizer (``adamw``, ``adamw8bit``), named
``unet+te/16-mixed/ckpt/adamw8bit``. Measured by simulation (``benchmarks/memory.py``: FakeTensorMode
+ MemTracker, nothing allocated); with ``--device cuda`` also by ``torch.cuda.max_memory_allocated``.

    python -m benchmarks.memory_sd                     # the default grid (8 rows, ~15 min on 2 CPU cores)
    python -m benchmarks.memory_sd --rows all --out memory.md
    python -m benchmarks.memory_sd --rows lora4/16-mixed/ckpt/adamw --device cuda
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time
import warnings
from unittest import mock
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from diffusers.utils import logging as diffusers_logging
from omegaconf import OmegaConf

from benchmarks import memory
from benchmarks.common import machine_line, markdown_table
from core.cli import run_cli
from core.config import DTYPES, instantiate_from_config
from core.optim import ADAMW_DEFAULT_DECAY, optimizer_class

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"full": ROOT / "configs" / "dreambooth.yaml", "tiny": ROOT / "configs" / "toy" / "dreambooth-tiny.yaml"}
RESOLUTION = {"full": 512, "tiny": 32}
MODES = ("unet", "unet+te", "lora4", "lora16")
CHECKPOINTING = ("ckpt", "nockpt")
OPTIMIZERS = ("adamw", "adamw8bit")
LR = 1e-6
PROMPTS = ("a photo of sks dog", "a photo of a dog")  # instance, class
# every factor at every value, each row a different combination (the full grid is 48 rows)
DEFAULT_ROWS = ("unet+te/fp32/ckpt/adamw", "unet+te/16-mixed/ckpt/adamw", "unet+te/16-mixed/ckpt/adamw8bit",
                "unet+te/bf16-mixed/nockpt/adamw8bit", "unet/16-mixed/ckpt/adamw8bit",
                "lora4/16-mixed/ckpt/adamw", "lora4/fp32/nockpt/adamw", "lora16/bf16-mixed/nockpt/adamw8bit")
QUICK_ROWS = ("unet+te/16-mixed/ckpt/adamw8bit", "lora4/16-mixed/ckpt/adamw")


@dataclasses.dataclass(frozen=True)
class Row:
    mode: str
    precision: str
    checkpointing: bool
    optimizer: str

    @classmethod
    def parse(cls, name: str) -> "Row":
        parts = name.split("/")
        choices = (MODES, tuple(memory.PRECISIONS), CHECKPOINTING, OPTIMIZERS)
        if len(parts) != 4 or any(p not in c for p, c in zip(parts, choices)):
            raise ValueError(f"--rows {name!r}: expected mode/precision/ckpt/optimizer with mode in {'|'.join(MODES)}, "
                             f"precision in {'|'.join(memory.PRECISIONS)}, {'|'.join(CHECKPOINTING)}, "
                             f"optimizer in {'|'.join(OPTIMIZERS)}")
        return cls(parts[0], parts[1], parts[2] == "ckpt", parts[3])

    @property
    def name(self) -> str:
        return "/".join((self.mode, self.precision, "ckpt" if self.checkpointing else "nockpt", self.optimizer))

    @property
    def lora_rank(self) -> int | None:
        return int(self.mode.removeprefix("lora")) if self.mode.startswith("lora") else None

    @property
    def train_text_encoder(self) -> bool:
        return self.mode == "unet+te"


def all_rows() -> list[str]:
    grid = itertools.product(MODES, memory.PRECISIONS, CHECKPOINTING, OPTIMIZERS)
    return ["/".join(r) for r in grid]


def model_config(size: str, row: Row) -> dict:
    """configs/dreambooth.yaml's model (or the toy one), set as the row says."""
    cfg = OmegaConf.load(CONFIGS[size])
    params = cfg.model.params
    params.unet_config.params.use_checkpoint = row.checkpointing
    params.cond_stage_config.setdefault("params", {})["use_checkpoint"] = row.checkpointing
    params.train_text_encoder = row.train_text_encoder
    params.optimizer = row.optimizer
    params.lora = None if row.lora_rank is None else {"rank": row.lora_rank}
    params.frozen_dtype = frozen_dtype(row)
    params.cache_latents = False  # a step that encodes its images, as the script's (a cached one skips the VAE)
    return OmegaConf.to_container(cfg.model, resolve=True)


def frozen_dtype(row: Row) -> str:
    """The frozen weights in the autocast dtype under mixed precision (diffusers' weight_dtype), else fp32."""
    dtype = memory.PRECISIONS[row.precision] or torch.float32
    return next(name for name, d in DTYPES.items() if d == dtype)


def images(size: str) -> list[torch.Tensor]:
    """One instance and one class image, (1, H, W, 3) in [-1, 1] as the data sets give them."""
    res = RESOLUTION[size]
    return [torch.rand(1, res, res, 3) * 2 - 1 for _ in PROMPTS]


# ---- ours ---------------------------------------------------------------------------------------
def ours(size: str, row: Row) -> memory.Job:
    model = instantiate_from_config(model_config(size, row))
    model.cast_frozen(without_base=True)  # as on_fit_start would for a run from a base file
    model.learning_rate = LR
    model.train()
    instance, klass = images(size)
    batch = {"instance": {"image": instance, "caption": [PROMPTS[0]]},
             "class": {"image": klass, "caption": [PROMPTS[1]]}}
    return memory.Job(modules=[model], forward=lambda: model.training_step(batch, 0),
                      make_optimizer=model.configure_optimizers, inputs=[instance, klass])


# ---- diffusers ----------------------------------------------------------------------------------
def reference_models(size: str) -> tuple[Any, Any, Any]:
    """diffusers' UNet and VAE from our config by diffusers' own mapping; transformers' CLIP text model
    with our text encoder's sizes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (create_unet_diffusers_config_from_ldm,
                                                     create_vae_diffusers_config_from_ldm)
    from transformers import CLIPTextConfig, CLIPTextModel

    ldm = {"model": OmegaConf.to_container(OmegaConf.load(CONFIGS[size]).model, resolve=True)}
    text = {"width": 768, "layers": 12, "heads": 12, **ldm["model"]["params"]["cond_stage_config"].get("params", {})}
    config = CLIPTextConfig(vocab_size=49408, hidden_size=text["width"], intermediate_size=4 * text["width"],
                            num_hidden_layers=text["layers"], num_attention_heads=text["heads"],
                            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=text["width"])
    return (UNet2DConditionModel(**create_unet_diffusers_config_from_ldm(ldm, {})),
            CLIPTextModel(config), AutoencoderKL(**create_vae_diffusers_config_from_ldm(ldm, {})))


def reference(size: str, row: Row) -> memory.Job:
    """diffusers' DreamBooth step (train_dreambooth.py; train_dreambooth_lora.py for LoRA rows)."""
    from diffusers import DDPMScheduler

    unet, text_encoder, vae = reference_models(size)
    weight_dtype = memory.PRECISIONS[row.precision] or torch.float32
    cast_(vae.requires_grad_(False), weight_dtype)
    if not row.train_text_encoder:
        cast_(text_encoder.requires_grad_(False), weight_dtype)
    if row.lora_rank is not None:
        add_peft_lora(unet, row.lora_rank, weight_dtype)
    if row.checkpointing:
        unet.enable_gradient_checkpointing()
        if row.train_text_encoder:
            text_encoder.activation_checkpointing_enable()
    unet.train()
    text_encoder.train(row.train_text_encoder)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear")
    pixels = torch.cat(images(size)).permute(0, 3, 1, 2).contiguous()  # (2, 3, H, W): instance, class
    input_ids = torch.randint(0, text_encoder.config.vocab_size, (2, 77))

    def forward() -> torch.Tensor:
        with torch.no_grad():
            latents = vae.encode(pixels.to(weight_dtype)).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (latents.shape[0],), device=latents.device)
        states = text_encoder(input_ids)[0]  # (2, 77, 768)
        pred = unet(scheduler.add_noise(latents, noise, t), t, states).sample
        pred, pred_prior = pred.chunk(2)
        target, target_prior = noise.chunk(2)
        return F.mse_loss(pred.float(), target.float()) + F.mse_loss(pred_prior.float(), target_prior.float())

    def make_optimizer() -> torch.optim.Optimizer:
        params = [p for m in (unet, text_encoder) for p in m.parameters() if p.requires_grad]
        return optimizer_class(row.optimizer)(params, lr=LR, weight_decay=ADAMW_DEFAULT_DECAY)

    return memory.Job(modules=[unet, text_encoder, vae], forward=forward, make_optimizer=make_optimizer,
                      inputs=[pixels, input_ids])


def cast_(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``module.to(dtype)`` for its frozen floating-point tensors, in place (``Module.to`` swaps fake
    tensors, which fails)."""
    for t in itertools.chain(module.parameters(), module.buffers()):
        if t.is_floating_point() and not t.requires_grad:
            t.data = t.data.to(dtype)
    return module


def add_peft_lora(unet: torch.nn.Module, rank: int, weight_dtype: torch.dtype) -> None:
    """As train_dreambooth_lora.py: peft adapters (alpha = rank, our default) on the attention
    projections of the frozen UNet, the adapters in float32 and the frozen weights in the weight dtype."""
    from peft import LoraConfig

    from ldm.modules.lora import UNET_ATTENTION

    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(UNET_ATTENTION))
    # peft moves each new layer to its base layer's device and dtype with Module.to, which cannot swap
    # fake tensors; here that move is the identity (every tensor is built on one device in float32)
    with mock.patch.object(torch.nn.Module, "to", lambda self, *args, **kwargs: self):
        unet.add_adapter(config)
    cast_(unet, weight_dtype)


# ---- measuring and reporting --------------------------------------------------------------------
SIDES: dict[str, Callable[[str, Row], memory.Job]] = {"ours": ours, "diffusers": reference}


def measure_row(size: str, row: Row, device: torch.device) -> dict[str, Any]:
    result: dict[str, Any] = {"row": row.name}
    for side, build in SIDES.items():
        start = time.perf_counter()
        peak = memory.simulate(lambda: build(size, row), row.precision)
        result[side] = {"peak": peak.total, "parts": peak.parts, "seconds": time.perf_counter() - start}
        if device.type == "cuda":
            real = memory.measure_cuda(lambda: build(size, row), row.precision, device)
            result[side]["cuda_peak"], result[side]["cuda_parts"] = real.total, real.parts
    result["ratio"] = result["ours"]["peak"] / result["diffusers"]["peak"]
    if device.type == "cuda":
        result["cuda_ratio"] = result["ours"]["cuda_peak"] / result["diffusers"]["cuda_peak"]
    return result


def gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def breakdown(parts: dict[str, int]) -> str:
    keys = ("params", "grads", "optimizer", "activations", "temp")
    return " / ".join(gib(parts.get(k, 0)) for k in keys)


def table(results: list[dict[str, Any]], cuda: bool) -> str:
    header = ["row", "ours GiB", "diffusers GiB", "ours / diffusers",
              "ours at peak: params / grads / optimizer / activations / temp"]
    header += ["CUDA ours GiB", "CUDA diffusers GiB", "CUDA ours / diffusers"] if cuda else []
    rows = []
    for r in results:
        cells = [r["row"], gib(r["ours"]["peak"]), gib(r["diffusers"]["peak"]), f"{r['ratio']:.2f}",
                 breakdown(r["ours"]["parts"])]
        if cuda:
            cells += [gib(r["ours"]["cuda_peak"]), gib(r["diffusers"]["cuda_peak"]), f"{r['cuda_ratio']:.2f}"]
        rows.append(cells)
    return markdown_table(header, rows)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    return memory.table_parser(
        __doc__.split("\n\n")[0], quick_rows=QUICK_ROWS,
        rows_help="rows mode/precision/ckpt|nockpt/optimizer, or 'all' (48 rows); default: 8 rows that take every "
                  "factor at every value",
        tiny_help="the toy-sized models (configs/toy/dreambooth-tiny.yaml): seconds, for tests").parse_args(argv)


def selected_rows(args: argparse.Namespace) -> list[Row]:
    return [Row.parse(n) for n in memory.row_names(args, QUICK_ROWS, DEFAULT_ROWS, all_rows)]


def run(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    rows, device, size = selected_rows(args), torch.device(args.device), "tiny" if args.tiny else "full"
    memory.check_device(device)
    diffusers_logging.set_verbosity_error()  # its advice on casting with .to() is beside the point here
    warnings.filterwarnings("ignore", message=".*self.trainer.*")  # Lightning's log without a Trainer
    print(f"# sd-v1 DreamBooth step ({size}, {RESOLUTION[size]} px, 1 instance + 1 class); "
          f"{machine_line(device)}", flush=True)
    memory.report_rows(rows, lambda row: measure_row(size, row, device), "diffusers",
                       lambda results: table(results, device.type == "cuda"), args.out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("benchmarks.memory_sd", run, argv)


if __name__ == "__main__":
    sys.exit(main())
