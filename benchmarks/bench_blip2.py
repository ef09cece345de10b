"""BLIP-2 OPT captioning and a stage-2 training step, ours against transformers: the same random
weights, one run.

Beam-search captioning of a batch of images with ``min_new_tokens = max_new_tokens``, so every row
decodes the same number of tokens on both sides. transformers' ``Blip2ForConditionalGeneration``
(its own random init) is saved to a temporary folder; ours loads it with ``Blip2OPT.from_pretrained``
and transformers reloads it with ``from_pretrained`` (both keep the Q-Former in fp32). Ours also runs
with the KV cache off (``use_cache=False``), to show what the cache buys. The generated token ids
of the two sides are compared and the agreement is printed with the figures.

The training step (``--what train``): stage 2 (ViT and OPT frozen; the Q-Former, its queries, the
projection and ``ln_vision`` trained), captions of ``--batch`` images. Ours: what main.py's loop
calls for one optimizer step of ``Blip2OPTFinetune`` (its lr setting, ``training_step`` --
tokenising the captions included --, backward, the AdamW step of ``configure_optimizers``,
``zero_grad``; Lightning's loop and logging not timed). transformers: ``Blip2ForConditionalGeneration
(pixel_values, input_ids, attention_mask, labels=)`` on ids its processor made (not timed: the
data loader's work), backward, ``torch.optim.AdamW`` over the same parameters with the same groups
(weight decay 0.05, none on biases and norms). Before timing, one step each in eval mode (no
dropout) from the same weights: the losses and the updates of the trained weights must agree.

    python -m benchmarks.bench_blip2                       # mid-size model, CPU, ~1-2 min on 2 cores
    python -m benchmarks.bench_blip2 --full --device cuda --dtype bf16   # opt-2.7b, batch 16
    python -m benchmarks.bench_blip2 --what train      # the stage-2 training step only
    python -m benchmarks.bench_blip2 --what train --compile   # both sides through torch.compile
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from transformers import Blip2Config, Blip2ForConditionalGeneration

from core.cli import ArgumentParser
from benchmarks.common import DTYPES, Timing, interleaved, machine_line, markdown_table
from blip2 import Blip2OPT
from blip2.losses.caption_lm import IGNORE_INDEX, caption_tokens
from blip2.models.finetune import Blip2OPTFinetune
from core.optim import set_lr

IMAGE_TOKEN, NEWLINE, PAD = 50265, 50118, 1  # the Hub's <image> id, OPT's "\n" (caption end), pad
ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "models" / "toy" / "blip2-tokenizer"  # a byte-level BPE (ids < 319) for the captions
CAPTIONS = ["a red square on a white background", "a small blue circle in the middle of the picture",
            "two green triangles", "a yellow star next to a big red square on a white background"]
LR, WEIGHT_DECAY = 1e-5, 0.05
TRAIN_TOLERANCE = {"loss": 1e-5, "update": 1e-3}  # AdamW's first update: sign-like, see bench_dreambooth
# The mid-size model: BLIP-2's shape (ViT/14 at 224 px, 32 queries, cross-attention every 2nd
# Q-Former layer, OPT with the real 50304-token vocabulary) at a fraction of its widths and depths.
MID = dict(
    vision_config=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6),
    qformer_config=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=6),
    text_config=dict(model_type="opt", vocab_size=50304, hidden_size=512, ffn_dim=2048, num_hidden_layers=6,
                     num_attention_heads=8, word_embed_proj_dim=512),
)
# Salesforce/blip2-opt-2.7b (current Hub revision): EVA ViT-g and BERT-base Q-Former are the defaults.
FULL = dict(
    vision_config={}, qformer_config={},
    text_config=dict(model_type="opt", vocab_size=50304, hidden_size=2560, ffn_dim=10240, num_hidden_layers=32,
                     num_attention_heads=32, word_embed_proj_dim=2560),
)


@dataclass(frozen=True)
class Setup:
    ours: Blip2OPT
    ref: Blip2ForConditionalGeneration
    pixel_values: torch.Tensor  # [B, 3, s, s]
    options: dict  # generation options shared by both sides


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="the full opt-2.7b size (default batch 16)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--batch", type=int, default=None, help="images per batch (default 8, 16 with --full)")
    p.add_argument("--num_beams", type=int, default=5)
    p.add_argument("--new_tokens", type=int, default=20, help="min_new_tokens = max_new_tokens")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per side, after one warm-up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--what", choices=["caption", "train", "both"], default="both")
    p.add_argument("--train_batch", type=int, default=4, help="images per training step")
    p.add_argument("--compile", action="store_true", help="training step: torch.compile the ViT, Q-Former "
                   "and language model on both sides (ours: model.params.compile); built in the warm-up")
    return p.parse_args(argv)


def save_reference(folder: Path, full: bool, dtype: torch.dtype, device: torch.device, seed: int) -> Blip2Config:
    """transformers' randomly initialised model, cast to ``dtype``, saved to ``folder``."""
    config = Blip2Config(**(FULL if full else MID), num_query_tokens=32, image_token_index=IMAGE_TOKEN)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Blip2ForConditionalGeneration(config)
    model.to(dtype).save_pretrained(str(folder))
    return config


def make_setup(args: argparse.Namespace, folder: Path) -> Setup:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    config = save_reference(folder, args.full, dtype, device, args.seed)
    ours = Blip2OPT.from_pretrained(folder, dtype=dtype, device=device)
    ref = Blip2ForConditionalGeneration.from_pretrained(str(folder), dtype=dtype).to(device).eval()
    size, batch = config.vision_config.image_size, args.batch or (16 if args.full else 8)
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    pixels = torch.randn(batch, 3, size, size, generator=gen, device=device).to(dtype)
    options = dict(num_beams=args.num_beams, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                   eos_token_id=NEWLINE)
    return Setup(ours, ref, pixels, options)


@torch.no_grad()
def run_ref(s: Setup) -> torch.Tensor:
    """transformers' captioning call; returns the new tokens [B, L]."""
    out = s.ref.generate(pixel_values=s.pixel_values, pad_token_id=PAD, **s.options)
    return out[:, -s.options["max_new_tokens"]:]


def describe(s: Setup, args: argparse.Namespace) -> str:
    n_params = sum(p.numel() for p in s.ours.parameters()) / 1e6
    size = "opt-2.7b" if args.full else "mid-size"
    b, _, px, _ = s.pixel_values.shape
    return (f"{size} BLIP-2 ({n_params:.0f}M params), {args.dtype}, batch {b} at {px} px, beams "
            f"{args.num_beams}, {args.new_tokens} new tokens")


def row(name: str, t: Timing, ref: Timing, batch: int, agree: str) -> list[str]:
    return [name, f"{t.median:.3f}", f"{batch / t.median:.2f}", f"{t.median / ref.median:.2f}", agree]


def bench_caption(s: Setup, args: argparse.Namespace, device: torch.device) -> None:
    print(f"# {describe(s, args)}; {machine_line(device)}", flush=True)
    sides = {
        "ours (KV cache)": lambda: s.ours.generate_ids(s.pixel_values, **s.options),
        "ours (no cache)": lambda: s.ours.generate_ids(s.pixel_values, use_cache=False, **s.options),
        "transformers": lambda: run_ref(s),
    }
    timings = interleaved(sides, device, warmup=1, repeats=args.repeats)
    ref_ids, batch = timings["transformers"].result, s.pixel_values.shape[0]
    rows = []
    for name, t in timings.items():
        same = (t.result.cpu() == ref_ids.cpu()).all(dim=1).sum().item()
        rows.append(row(name, t, timings["transformers"], batch, f"{same}/{batch}"))
    header = ["side", "median s / batch", "images/s", "vs transformers", "captions equal to transformers'"]
    print(markdown_table(header, rows))
    print(f"# finished captioning; {machine_line(device)}", flush=True)


# ---- the stage-2 training step ------------------------------------------------------------------
@dataclass
class TrainSetup:
    ours: Blip2OPTFinetune
    ours_opt: torch.optim.Optimizer
    ref: Blip2ForConditionalGeneration
    ref_opt: torch.optim.Optimizer
    batch: dict  # ours: {"image", "text_input"}
    ref_inputs: dict  # transformers: pixel_values, input_ids, attention_mask, labels


def reference_groups(ref: Blip2ForConditionalGeneration) -> list[dict]:
    """Stage 2 on transformers' model: freeze the ViT (but its post-layernorm, LAVIS's ln_vision)
    and OPT; AdamW groups with and without weight decay (biases and norms: none)."""
    for part in (ref.vision_model.embeddings, ref.vision_model.encoder, ref.language_model):
        part.requires_grad_(False)
    trained = [p for p in ref.parameters() if p.requires_grad]
    return [{"params": [p for p in trained if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
            {"params": [p for p in trained if p.ndim < 2], "weight_decay": 0.0}]


def make_train_setup(args: argparse.Namespace, folder: Path) -> TrainSetup:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    config = save_reference(folder, args.full, dtype, device, args.seed)
    for f in TOKENIZER.iterdir():
        shutil.copy(f, folder / f.name)
    with torch.device(device):
        ours = Blip2OPTFinetune(pretrained=str(folder), learning_rate=LR, weight_decay=WEIGHT_DECAY,
                                compile=args.compile)
    ref = Blip2ForConditionalGeneration.from_pretrained(str(folder), dtype=dtype).to(device)
    if args.compile:
        for part in (ref.vision_model, ref.qformer, ref.language_model):
            part.compile()
    ref_opt = torch.optim.AdamW(reference_groups(ref), lr=LR, betas=(0.9, 0.999), eps=1e-8)
    n, size = args.train_batch, config.vision_config.image_size
    gen = torch.Generator(device=device).manual_seed(args.seed + 2)
    pixels = torch.randn(n, 3, size, size, generator=gen, device=device).to(dtype)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]
    tokens = caption_tokens(ours.model.tokenizer, captions, ours.prompt_len, ours.max_txt_len)
    q = config.num_query_tokens
    ref_inputs = dict(pixel_values=pixels,
                      input_ids=torch.cat([torch.full((n, q), IMAGE_TOKEN), tokens.input_ids], 1).to(device),
                      attention_mask=torch.cat([torch.ones(n, q, dtype=torch.long), tokens.attention_mask], 1).to(device),
                      labels=torch.cat([torch.full((n, q), IGNORE_INDEX), tokens.labels], 1).to(device))
    return TrainSetup(ours, ours.configure_optimizers(), ref, ref_opt, {"image": pixels, "text_input": captions},
                      ref_inputs)


def ours_train_step(t: TrainSetup) -> torch.Tensor:
    set_lr(t.ours_opt, t.ours.learning_rate)  # on_train_batch_start: the schedule's lr (constant here)
    loss = t.ours.training_step(t.batch, 0)
    loss.backward()
    t.ours_opt.step()
    t.ours_opt.zero_grad(set_to_none=True)
    return loss.detach()


def ref_train_step(t: TrainSetup) -> torch.Tensor:
    loss = t.ref(**t.ref_inputs).loss
    loss.backward()
    t.ref_opt.step()
    t.ref_opt.zero_grad(set_to_none=True)
    return loss.detach()


def trained_vector(model: torch.nn.Module) -> torch.Tensor:
    """The trained parameters, by name order (ours and transformers use the same names)."""
    return torch.cat([p.detach().flatten().double() for _, p in sorted(model.named_parameters())
                      if p.requires_grad])


def check_train_step(t: TrainSetup) -> dict[str, float]:
    t.ours.eval(), t.ref.eval()
    before_o, before_r = trained_vector(t.ours.model), trained_vector(t.ref)
    if before_o.shape != before_r.shape or not torch.equal(before_o, before_r):
        raise SystemExit("bench_blip2: the two sides do not start from the same trained weights")
    loss_o, loss_r = ours_train_step(t), ref_train_step(t)
    delta_o, delta_r = trained_vector(t.ours.model) - before_o, trained_vector(t.ref) - before_r
    t.ours.train(), t.ref.train()
    return {"loss": (abs(loss_o - loss_r) / abs(loss_r)).item(),
            "update": ((delta_o - delta_r).norm() / delta_r.norm()).item()}


def bench_train(args: argparse.Namespace, device: torch.device) -> None:
    with tempfile.TemporaryDirectory(prefix="bench_blip2_train_") as tmp:
        t = make_train_setup(args, Path(tmp))
    errors = check_train_step(t)
    bad = {k: v for k, v in errors.items() if v > TRAIN_TOLERANCE[k]}
    if bad:
        raise SystemExit(f"bench_blip2: the training steps differ ({bad}): not the same computation")
    timings = interleaved({"ours": lambda: ours_train_step(t), "transformers": lambda: ref_train_step(t)},
                          device, warmup=1, repeats=args.repeats)
    n_trained = sum(p.numel() for p in t.ours.parameters() if p.requires_grad) / 1e6
    print(f"# stage-2 training step, batch {args.train_batch}, {n_trained:.1f}M trained parameters, "
          f"{args.dtype}{', torch.compile' if args.compile else ''}; {machine_line(device)}", flush=True)
    ref_s = timings["transformers"].median
    agree = ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
    rows = [[name, f"{tm.median:.3f}", f"{tm.median / ref_s:.2f}", agree if name == "ours" else ""]
            for name, tm in timings.items()]
    print(markdown_table(["side", "median s / step", "vs transformers", "one-step agreement"], rows))
    print("# seconds per step: " + "; ".join(f"{k} " + " ".join(f"{v:.3f}" for v in tm.seconds)
                                             for k, tm in timings.items()))
    print(f"# finished training step; {machine_line(device)}")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    warnings.filterwarnings("ignore", ".*self.log.*")  # no trainer: our training_step's log is a no-op
    if args.what in ("caption", "both"):
        with tempfile.TemporaryDirectory(prefix="bench_blip2_") as tmp:
            s = make_setup(args, Path(tmp))
        bench_caption(s, args, device)
    if args.what in ("train", "both"):
        bench_train(args, device)


if __name__ == "__main__":
    main(sys.argv[1:])
