"""Every GPU figure in one command: full-size sd-v1 and BLIP-2 opt-2.7b, ours against diffusers /
transformers on the same random weights (no downloads), and the memory benchmark's real figures
beside its simulation.

Sections (each in its own try: a failure is reported and the rest still run; a section whose
estimate no longer fits the time budget is skipped):

1. sd-v1 at 512x512 (64x64 latents), bf16 then fp16: the DreamBooth step of
   ``benchmarks/workloads.py`` (n instance + n class latents, one UNet forward, prior loss,
   backward, AdamW) under autocast with fp32 weights (diffusers' mixed precision; fp16 with a static
   loss scale), and DDIM + CFG 7.5 sampling with the weights in the dtype (as the pipelines'
   ``torch_dtype``). Figures: images/s, it/s, model FLOP utilisation and the peak memory above what
   was held (``torch.cuda.max_memory_allocated``).
2. BLIP-2 opt-2.7b (bf16; the Q-Former fp32 on both sides): beam-5 captioning of a batch of 16
   (20 new tokens, images/s) and one stage-2 fine-tuning step (ViT and OPT frozen).
3. ``benchmarks/memory_sd.py``'s quick rows: simulated peak (FakeTensorMode + MemTracker) beside
   ``torch.cuda.max_memory_allocated``, ours and diffusers.

Model FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one run of the
reference's step (the same count serves both sides' utilisation; each side's own count is printed:
they agree for the SD and fine-tuning steps; in beam search ours computes fewer. CUDA attention
kernels are counted, the CPU's fused attention is not); the device's dense 16-bit tensor peak comes from ``PEAK_TFLOPS`` by
``torch.cuda.get_device_name``, or ``--peak_tflops``. Targets: ours / reference <= 0.9, and >= 35%
utilisation for the sd-v1 training step and batched sampling.

    python -m benchmarks.gpu --out gpu.md          # a CUDA machine: under 8 minutes
    python -m benchmarks.gpu --smoke               # tiny models on the CPU: seconds (the test suite's)
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from diffusers.utils import logging as diffusers_logging
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import memory, memory_sd, workloads
from benchmarks.bench_sd import LOSS_SCALE, TOLERANCE, check_forward, rel_err
from benchmarks.common import Timing, interleaved, machine_line, markdown_table
from core.cli import ArgumentParser, first_line, run_cli
from core.config import DTYPES

# Dense (no sparsity) 16-bit tensor-core peaks in TFLOP/s with fp32 accumulation, from NVIDIA's data
# sheets; the first name found in torch.cuda.get_device_name wins (so H100 PCIe before H100).
PEAK_TFLOPS = (("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
               ("H800", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("A10G", 70.0),
               ("A10", 125.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A6000", 155.0),
               ("4090", 165.0), ("3090", 71.0), ("V100", 125.0), ("T4", 65.0))
# Seconds a section is expected to need on an H100-class GPU (guesses until measured): the budget
# guard skips a section that no longer fits.
ESTIMATE_S = {"sd-bf16": 60, "sd-fp16": 60, "blip2": 150, "memory": 150}
SMOKE_ROW = "lora4/fp32/nockpt/adamw"


@dataclasses.dataclass
class Sizes:
    sd: str
    blip2: str
    memory: str
    latent: int
    train_images: int  # n instance + n class
    sample_batch: int  # CFG doubles it
    steps: int
    caption_batch: int
    new_tokens: int
    repeats: int
    rows: tuple[str, ...]


FULL = Sizes("full", "full", "full", 64, 8, 8, 20, 16, 20, 5, memory_sd.QUICK_ROWS)
SMOKE = Sizes("tiny", "tiny", "tiny", 8, 2, 1, 1, 2, 3, 1, (SMOKE_ROW,))


@dataclasses.dataclass
class Section:
    name: str
    title: str
    text: str = ""  # the markdown table
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    status: str = "ok"  # ok | failed: ... | skipped: ...
    seconds: float = 0.0


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny models on the CPU: every code path in seconds")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    p.add_argument("--sections", nargs="+", choices=list(ESTIMATE_S), default=list(ESTIMATE_S))
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="the device's dense 16-bit peak (default: from the device name, PEAK_TFLOPS)")
    p.add_argument("--budget_s", type=float, default=450.0, help="skip sections that would end after this")
    p.add_argument("--out", default=None, help="also write the markdown report here (after every section)")
    args = p.parse_args(argv)
    args.device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here (--smoke runs the tiny models on the CPU)")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise ValueError(f"--peak_tflops {args.peak_tflops}: expected a positive number")
    return args


def peak_tflops(device_name: str) -> float | None:
    """The dense 16-bit peak of a known device, by (part of) its name; None when unknown."""
    return next((tflops for key, tflops in PEAK_TFLOPS if key in device_name), None)


def device_peak(args: argparse.Namespace) -> tuple[float | None, str]:
    if args.peak_tflops is not None:
        return args.peak_tflops, f"{args.peak_tflops:g} TFLOP/s (--peak_tflops)"
    if args.device.type != "cuda":
        return None, "unknown (not a CUDA device: pass --peak_tflops)"
    name = torch.cuda.get_device_name(args.device)
    peak = peak_tflops(name)
    return peak, f"{peak:g} TFLOP/s ({name}, dense 16-bit)" if peak else f"unknown ({name}: pass --peak_tflops)"


# ---- measuring ----------------------------------------------------------------------------------
def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call, as FlopCounterMode counts them (matmuls, convolutions, attention)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@dataclasses.dataclass
class Pair:
    """Timings of both sides, the model FLOPs of one run (the reference's count) and ours' count."""

    timings: dict[str, Timing]
    flops: int
    flops_ours: int


def measure(sides: dict[str, Callable[[], Any]], device: torch.device, repeats: int,
            flops_of: dict[str, Callable[[], Any]] | None = None) -> Pair:
    """Interleaved timings after a warm-up; FLOPs counted on ``flops_of`` (default: the sides)."""
    timings = interleaved(sides, device, warmup=1, repeats=repeats)
    flops_of = flops_of or sides
    return Pair(timings, count_flops(flops_of["ref"]), count_flops(flops_of["ours"]))


def utilisation(flops: int, seconds: float, peak: float | None) -> str:
    return f"{100 * flops / seconds / (peak * 1e12):.1f}%" if peak else "n/a"


def gib(n: int) -> str:
    return f"{n / 2**30:.2f}" if n else "-"


def pair_rows(what: str, pair: Pair, per_run: int, unit: str, peak: float | None, agreement: str,
              ref_name: str) -> list[list[str]]:
    """One row a side: seconds, throughput, ours/ref, utilisation, peak memory, agreement."""
    ref = pair.timings["ref"].median
    rows = []
    for side, name in (("ours", "ours"), ("ref", ref_name)):
        t, flops = pair.timings[side], pair.flops_ours if side == "ours" else pair.flops
        rows.append([what, name, f"{t.median:.4f}", f"{per_run / t.median:.2f} {unit}", f"{t.median / ref:.2f}",
                     f"{flops / 1e9:.3g}", utilisation(pair.flops, t.median, peak), gib(t.peak_bytes), agreement])
    return rows


def record(section: Section, what: str, pair: Pair, per_run: int, errors: dict[str, float]) -> None:
    section.records.append({"what": what, "flops": pair.flops, "flops_ours": pair.flops_ours, "per_run": per_run,
                            "seconds": {k: t.median for k, t in pair.timings.items()},
                            "peak_bytes": {k: t.peak_bytes for k, t in pair.timings.items()}, "errors": errors})


PAIR_HEADER = ["workload", "side", "s / run", "throughput", "ours / ref", "GFLOP / run (counted)",
               "model FLOP utilisation (ref's FLOPs)",
               "peak GiB over held", "agreement (rel. error)"]


# ---- sections -----------------------------------------------------------------------------------
def in_parts(section: Section, parts: Sequence[Callable[[list[str]], list[list[str]]]], note: str = "") -> None:
    """Run each part (it returns table rows and notes disagreements in the list it is given); a
    failure or disagreement of one part is reported after the others have run (the section then
    fails, its table kept)."""
    rows, problems = [], []
    for part in parts:
        try:
            rows += part(problems)
        except Exception as err:
            traceback.print_exc()
            problems.append(f"{getattr(part, 'func', part).__name__}: {type(err).__name__}: {first_line(err)}")
    section.text = markdown_table(PAIR_HEADER, rows) + note
    if problems:
        raise RuntimeError("; ".join(problems))


def sd_section(section: Section, dtype_name: str, sizes: Sizes, args: argparse.Namespace) -> None:
    """The DreamBooth step, then sampling, on one pair of sd-v1 models."""
    m, dtype = workloads.sd_models(sizes.sd, args.device), DTYPES[dtype_name]
    m.ours.eval(), m.ref.eval()
    parity = check_forward(workloads.sd_inputs(m, 1, sizes.latent, 0))
    parts = [functools.partial(sd_train, section, m, dtype, sizes, args),
             functools.partial(sd_sampling, section, m, dtype, sizes, args)]
    in_parts(section, parts, f"\n\nfp32 forward parity before the runs: {parity:.1e}")


def sd_train(section: Section, m: workloads.SDModels, dtype: torch.dtype, sizes: Sizes,
             args: argparse.Namespace, problems: list[str]) -> list[list[str]]:
    """The DreamBooth step: fp32 weights under autocast (fp16: a static loss scale)."""
    s = workloads.sd_inputs(m, sizes.train_images, sizes.latent, 0)
    steps = workloads.dreambooth_pair(s, m, autocast=dtype, loss_scale=LOSS_SCALE[dtype])
    pair = measure(steps, args.device, sizes.repeats)
    errors = workloads.train_agreement(pair.timings["ours"].result, pair.timings["ref"].result)
    what = f"DreamBooth step, {sizes.train_images} images ({sizes.train_images // 2} + {sizes.train_images // 2})"
    record(section, what, pair, sizes.train_images, errors)
    for step in steps.values():  # free the gradients before sampling
        step.optimizer.zero_grad(set_to_none=True)
    return pair_rows(what, pair, sizes.train_images, "images/s", device_peak(args)[0],
                     agreement(what, errors, TOLERANCE[dtype], problems), "diffusers")


def sd_sampling(section: Section, m: workloads.SDModels, dtype: torch.dtype, sizes: Sizes,
                args: argparse.Namespace, problems: list[str]) -> list[list[str]]:
    """DDIM + CFG with the weights in the dtype (the schedules stay fp32)."""
    m.ours.eval(), m.ref.eval()
    m.ours.model.to(dtype), m.ref.to(dtype)
    s = workloads.sd_inputs(m, sizes.sample_batch, sizes.latent, sizes.steps, dtype=dtype)
    one_step = workloads.sampling_pair(dataclasses.replace(s, steps=1))
    pair = measure(workloads.sampling_pair(s), args.device, sizes.repeats, flops_of=one_step)
    pair.flops, pair.flops_ours = pair.flops * sizes.steps, pair.flops_ours * sizes.steps
    errors = {"latents": rel_err(pair.timings["ours"].result, pair.timings["ref"].result)}
    what = f"DDIM {sizes.steps} steps + CFG, batch {sizes.sample_batch} (x2)"
    record(section, what, pair, sizes.steps, errors)
    return pair_rows(what, pair, sizes.steps, "it/s", device_peak(args)[0],
                     agreement(what, errors, TOLERANCE[dtype], problems), "diffusers")


def agreement(what: str, errors: dict[str, float], tol: float, problems: list[str]) -> str:
    """The agreement cell; a relative error above ``tol`` is flagged and noted in ``problems``."""
    bad = {k: v for k, v in errors.items() if v > tol}
    if bad:
        problems.append(f"{what}: {', '.join(bad)} differ (relative error > {tol:.0e}): not the same computation")
    return fmt(errors) + (f" MISMATCH (> {tol:.0e})" if bad else "")


def blip2_section(section: Section, sizes: Sizes, args: argparse.Namespace) -> None:
    """Captioning, then the fine-tuning step, on one pair of BLIP-2 models (bf16; fp32 in --smoke)."""
    dtype = torch.float32 if args.smoke else torch.bfloat16
    ours, ref = workloads.blip2_models(sizes.blip2, args.device, dtype)
    ours.requires_grad_(False), ref.requires_grad_(False)
    pixels = workloads.blip2_pixels(ours, sizes.caption_batch)
    parts = [functools.partial(blip2_caption, section, ours, ref, pixels, sizes, args),
             functools.partial(blip2_finetune, section, ours, ref, pixels, dtype, sizes, args)]
    in_parts(section, parts)


def blip2_caption(section: Section, ours: Any, ref: Any, pixels: torch.Tensor, sizes: Sizes,
                  args: argparse.Namespace, problems: list[str]) -> list[list[str]]:
    pair = measure(workloads.caption_pair(ours, ref, pixels, 5, sizes.new_tokens), args.device,
                   min(sizes.repeats, 3))
    agree = workloads.equal_rows(pair.timings["ours"].result, pair.timings["ref"].result)
    what = f"beam-5 captioning, batch {sizes.caption_batch}, {sizes.new_tokens} new tokens"
    record(section, what, pair, sizes.caption_batch, {})
    return pair_rows(what, pair, sizes.caption_batch, "images/s", device_peak(args)[0], agree, "transformers")


def blip2_finetune(section: Section, ours: Any, ref: Any, pixels: torch.Tensor, dtype: torch.dtype,
                   sizes: Sizes, args: argparse.Namespace, problems: list[str]) -> list[list[str]]:
    """Stage 2: the ViT and OPT frozen; under autocast on a GPU."""
    steps = workloads.finetune_pair(ours, ref, pixels, autocast=None if args.smoke else dtype)
    pair = measure(steps, args.device, sizes.repeats)
    errors = workloads.train_agreement(pair.timings["ours"].result, pair.timings["ref"].result)
    what = f"stage-2 fine-tuning step, batch {sizes.caption_batch}"
    record(section, what, pair, sizes.caption_batch, errors)
    return pair_rows(what, pair, sizes.caption_batch, "images/s", device_peak(args)[0],
                     agreement(what, errors, TOLERANCE[dtype], problems), "transformers")


def memory_section(section: Section, sizes: Sizes, args: argparse.Namespace, deadline: float) -> None:
    """memory_sd's rows: simulated and real peak (CUDA: max_memory_allocated; CPU: MemTracker)."""
    rows = []
    for name in sizes.rows:
        if time.perf_counter() > deadline:
            rows.append([name] + ["skipped (time budget)"] * 6)
            continue
        row = memory_sd.Row.parse(name)
        r = memory_sd.measure_row(sizes.memory, row, args.device)
        if args.device.type != "cuda":
            for side, build in memory_sd.SIDES.items():
                r[side]["cuda_peak"] = memory.track_real(lambda: build(sizes.memory, row), row.precision).total
        sim = {side: r[side]["peak"] for side in memory_sd.SIDES}
        real = {side: r[side]["cuda_peak"] for side in memory_sd.SIDES}
        rows.append([name, gib(sim["ours"]), gib(real["ours"]), gib(sim["diffusers"]), gib(real["diffusers"]),
                     f"{sim['ours'] / sim['diffusers']:.2f}", f"{real['ours'] / real['diffusers']:.2f}"])
        section.records.append({"row": name, "simulated": sim, "real": real})
    how = "torch.cuda.max_memory_allocated" if args.device.type == "cuda" else "MemTracker on real CPU tensors"
    header = ["row", "ours simulated GiB", "ours real GiB", "diffusers simulated GiB", "diffusers real GiB",
              "ours / diffusers simulated", "ours / diffusers real"]
    section.text = markdown_table(header, rows) + f"\n\nreal: {how}; simulated: FakeTensorMode + MemTracker"


def fmt(errors: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1e}" for k, v in errors.items())


# ---- driver -------------------------------------------------------------------------------------
TITLES = {"sd-bf16": "sd-v1 {px}x{px}, bf16", "sd-fp16": "sd-v1 {px}x{px}, fp16",
          "blip2": "BLIP-2 opt-2.7b", "memory": "DreamBooth step memory: simulated and real"}


def run_section(name: str, sizes: Sizes, args: argparse.Namespace, start: float) -> Section:
    size = "tiny" if args.smoke else "full-size"
    section = Section(name, f"{TITLES[name].format(px=sizes.latent * 8)} ({size})")
    left = args.budget_s - (time.perf_counter() - start)
    if not args.smoke and left < ESTIMATE_S[name]:
        section.status = f"skipped: {left:.0f} s of the time budget left, about {ESTIMATE_S[name]} s needed"
        return section
    began = time.perf_counter()
    try:
        if name.startswith("sd-"):
            sd_section(section, name.removeprefix("sd-"), sizes, args)
        elif name == "blip2":
            blip2_section(section, sizes, args)
        else:
            memory_section(section, sizes, args, start + args.budget_s)
    except (Exception, SystemExit) as err:  # bench_sd.check ends with SystemExit
        traceback.print_exc()
        section.status = f"failed: {type(err).__name__}: {first_line(err)}"
    section.seconds = time.perf_counter() - began
    gc.collect()
    if args.device.type == "cuda":
        torch.cuda.empty_cache()
    return section


def report(sections: list[Section], header: str) -> str:
    parts = [f"# GPU figures\n\n{header}\n"]
    for s in sections:
        parts.append(f"## {s.title}\n\n{s.status}, {s.seconds:.0f} s\n\n{s.text}\n")
    return "\n".join(parts)


def run_all(args: argparse.Namespace) -> list[Section]:
    sizes, start = SMOKE if args.smoke else FULL, time.perf_counter()
    _, peak_text = device_peak(args)
    header = (f"{machine_line(args.device)}; peak {peak_text}; "
              f"targets: ours / ref <= 0.9, utilisation >= 35% (sd-v1 step and sampling)")
    sections = []
    for name in args.sections:
        sections.append(run_section(name, sizes, args, start))
        print(f"# {name}: {sections[-1].status} ({sections[-1].seconds:.0f} s)", flush=True)
        if args.out:
            Path(args.out).write_text(report(sections, header))
    print(report(sections, header + f"; total {time.perf_counter() - start:.0f} s"))
    return sections


def run(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    diffusers_logging.set_verbosity_error()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 parity check
    sections = run_all(args)
    return 1 if any(s.status.startswith("failed") for s in sections) else 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("benchmarks.gpu", run, argv)


if __name__ == "__main__":
    sys.exit(main())
