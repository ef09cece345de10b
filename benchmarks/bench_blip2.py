"""BLIP-2 OPT captioning throughput, ours against transformers: the same random weights, one run.

Beam-search captioning of a batch of images with ``min_new_tokens = max_new_tokens``, so every row
decodes the same number of tokens on both sides. transformers' ``Blip2ForConditionalGeneration``
(its own random init) is saved to a temporary folder; ours loads it with ``Blip2OPT.from_pretrained``
and transformers reloads it with ``from_pretrained`` (both keep the Q-Former in fp32). Ours also runs
with the KV cache off (``use_cache=False``), to show what the cache buys. The generated token ids
of the two sides are compared and the agreement is printed with the figures.

    python -m benchmarks.bench_blip2                       # mid-size model, CPU, ~1-2 min on 2 cores
    python -m benchmarks.bench_blip2 --full --device cuda --dtype bf16   # opt-2.7b, batch 16
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from transformers import Blip2Config, Blip2ForConditionalGeneration

from core.cli import ArgumentParser
from benchmarks.common import DTYPES, Timing, interleaved, machine_line, markdown_table
from blip2 import Blip2OPT

IMAGE_TOKEN, NEWLINE, PAD = 50265, 50118, 1  # the Hub's <image> id, OPT's "\n" (caption end), pad
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


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="bench_blip2_") as tmp:
        s = make_setup(args, Path(tmp))
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
    print(f"# finished; {machine_line(device)}")


if __name__ == "__main__":
    main(sys.argv[1:])
