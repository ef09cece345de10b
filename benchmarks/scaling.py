"""How cost grows, ours against the references: time and peak memory of DDIM + CFG sampling against
resolution and batch, of a DreamBooth step against batch, of BLIP-2 beam captioning against batch
and beam count; the same weights and inputs on both sides, one run.

The workloads are ``benchmarks/workloads.py``'s (diffusers' UNet2DConditionModel + DDIMScheduler
loop; transformers' Blip2ForConditionalGeneration). Time: the median of interleaved repeats after a
warm-up (``benchmarks/common.py``), per DDIM step for sampling, per step for DreamBooth, per batch
for captioning. Peak memory: ``benchmarks/memory.py``'s MemTracker on the real tensors of one more
run (a 1-step sampling run, one training step with its AdamW state, one captioning call): every
tensor storage alive at the worst moment, weights included; not the allocator's RSS. Both sides
must agree (SD: latents, loss and gradients at the fp32 bound, else an error; captions: the equal
rows are reported).

On a CPU the default sizes are the mid-size models of bench_sd / bench_blip2 (sd-v1's classes at a
fifth of the width; BLIP-2 with OPT 512x6), the pixel sizes as sd-v1 would see them (latents = px/8).

    python -m benchmarks.scaling --out scaling.md --plot docs/scaling.png   # 5-9 min, 1 thread, 2-core CPU
    python -m benchmarks.scaling --full                                     # more points
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from diffusers.utils import logging as diffusers_logging

from benchmarks import memory, workloads
from benchmarks.bench_sd import TOLERANCE, check, rel_err
from benchmarks.common import interleaved, machine_line, markdown_table
from core.cli import ArgumentParser, run_cli

REFERENCE = {"sd": "diffusers", "blip2": "transformers"}
# sweep -> (model, x label, unit of time, default points, --full points, --tiny points)
SWEEPS = {
    "sampling-px": ("sd", "px (batch 1)", "s / DDIM step", (256, 512, 768), (256, 384, 512, 640, 768), (64, 128)),
    "sampling-batch": ("sd", "batch (256 px)", "s / DDIM step", (1, 2, 4), (1, 2, 4, 8), (1, 2)),
    "dreambooth-batch": ("sd", "images (n instance + n class, 256 px)", "s / step", (2, 4, 8), (2, 4, 8, 16), (2, 4)),
    "caption-batch": ("blip2", "batch (beam 5)", "s / batch", (1, 4, 8), (1, 2, 4, 8, 16), (1, 2)),
    "caption-beams": ("blip2", "beams (batch 4)", "s / batch", (1, 3, 5), (1, 2, 3, 5, 8), (1, 3)),
}
BASE_PX = {"tiny": 64, "mid": 256}
CAPTION_BATCH, CAPTION_BEAMS = 4, 5


@dataclasses.dataclass
class Point:
    sweep: str
    x: int
    seconds: dict[str, float]  # side -> median seconds per unit
    peak: dict[str, int]  # side -> peak bytes (MemTracker)
    agreement: str


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="more points per sweep (about 3x the time)")
    size.add_argument("--tiny", action="store_true", help="tiny models and 2 points a sweep: seconds, for tests")
    p.add_argument("--sweeps", nargs="+", choices=list(SWEEPS), default=list(SWEEPS))
    p.add_argument("--steps", type=int, default=2, help="DDIM steps per timed sampling run")
    p.add_argument("--new_tokens", type=int, default=8, help="captioning: min_new_tokens = max_new_tokens")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per side, after one warm-up")
    p.add_argument("--no_memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument("--out", default=None, help="also write the markdown table here")
    p.add_argument("--plot", default=None, help="also draw the figures into this PNG (needs matplotlib)")
    args = p.parse_args(argv)
    if min(args.steps, args.new_tokens, args.repeats) < 1:
        raise ValueError("--steps, --new_tokens and --repeats: expected integers >= 1")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise ValueError(f"--plot {args.plot}: matplotlib is not installed (pip install matplotlib)")
    return args


# ---- measuring ----------------------------------------------------------------------------------
def timed(sides: dict[str, Callable[[], Any]], repeats: int, per: int = 1) -> tuple[dict[str, float], dict]:
    timings = interleaved(sides, torch.device("cpu"), warmup=1, repeats=repeats)
    return {k: t.median / per for k, t in timings.items()}, {k: t.result for k, t in timings.items()}


def peaks(jobs: dict[str, Callable[[], memory.Job]], enabled: bool) -> dict[str, int]:
    return {side: memory.track_real(build).total if enabled else 0 for side, build in jobs.items()}


def sampling_point(m: workloads.SDModels, sweep: str, x: int, batch: int, px: int,
                   args: argparse.Namespace) -> Point:
    s = workloads.sd_inputs(m, batch, px // 8, args.steps)
    seconds, results = timed(workloads.sampling_pair(s), args.repeats, per=args.steps)
    err = rel_err(results["ours"], results["ref"])
    check(f"{sweep} {x}: latents", err, TOLERANCE[torch.float32])
    one = workloads.sampling_pair(dataclasses.replace(s, steps=1))
    inputs = [s.x, s.context, s.uncontext]
    jobs = {"ours": lambda: memory.Job([m.ours], one["ours"], inputs=inputs),
            "ref": lambda: memory.Job([m.ref], one["ref"], inputs=inputs)}
    return Point(sweep, x, seconds, peaks(jobs, not args.no_memory), f"latents {err:.1e}")


def dreambooth_point(m: workloads.SDModels, x: int, px: int, args: argparse.Namespace) -> Point:
    s = workloads.sd_inputs(m, x, px // 8, 0)
    steps = workloads.dreambooth_pair(s, m)
    seconds, results = timed(steps, args.repeats)
    errors = workloads.train_agreement(results["ours"], results["ref"])
    for name, err in errors.items():
        check(f"dreambooth-batch {x}: {name}", err, TOLERANCE[torch.float32])
    jobs = {side: train_job(module, step) for side, module, step in
            (("ours", m.ours, steps["ours"]), ("ref", m.ref, steps["ref"]))}
    m.ours.eval(), m.ref.eval()
    return Point("dreambooth-batch", x, seconds, peaks(jobs, not args.no_memory),
                 ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))


def train_job(module: torch.nn.Module, step: workloads.TrainStep) -> Callable[[], memory.Job]:
    params = list(step.params.values())
    return lambda: memory.Job([module], step.loss, make_optimizer=lambda: torch.optim.AdamW(params, lr=0.0))


def caption_point(ours: Any, ref: Any, pixels: torch.Tensor, sweep: str, x: int, batch: int, beams: int,
                  args: argparse.Namespace) -> Point:
    sides = workloads.caption_pair(ours, ref, pixels[:batch], beams, args.new_tokens)
    seconds, results = timed(sides, args.repeats)
    jobs = {"ours": lambda: memory.Job([ours], sides["ours"], inputs=[pixels]),
            "ref": lambda: memory.Job([ref], sides["ref"], inputs=[pixels])}
    return Point(sweep, x, seconds, peaks(jobs, not args.no_memory), workloads.equal_rows(*results.values()))


def run_sd(args: argparse.Namespace, size: str, points: dict[str, Sequence[int]]) -> list[Point]:
    m, base = workloads.sd_models(size, torch.device("cpu")), BASE_PX[size]
    m.ours.eval(), m.ref.eval()
    out = []
    for sweep, xs in points.items():
        for x in xs:
            if sweep == "sampling-px":
                out.append(sampling_point(m, sweep, x, 1, x, args))
            elif sweep == "sampling-batch":
                out.append(sampling_point(m, sweep, x, x, base, args))
            else:
                out.append(dreambooth_point(m, x, base, args))
            progress(out[-1])
    return out


def run_blip2(args: argparse.Namespace, size: str, points: dict[str, Sequence[int]]) -> list[Point]:
    ours, ref = workloads.blip2_models(size, torch.device("cpu"))
    ours.requires_grad_(False), ref.requires_grad_(False)  # inference (MemTracker's hooks want no leaves)
    largest = max([CAPTION_BATCH, *points.get("caption-batch", ())])
    pixels = workloads.blip2_pixels(ours, largest)
    out = []
    for sweep, xs in points.items():
        for x in xs:
            batch, beams = (x, CAPTION_BEAMS) if sweep == "caption-batch" else (CAPTION_BATCH, x)
            out.append(caption_point(ours, ref, pixels, sweep, x, batch, beams, args))
            progress(out[-1])
    return out


def progress(p: Point) -> None:
    print(f"# {p.sweep} {p.x}: ours {p.seconds['ours']:.3f} s, ref {p.seconds['ref']:.3f} s, "
          f"peak {mib(p.peak['ours'])} / {mib(p.peak['ref'])} MiB; {p.agreement}", flush=True)


# ---- report -------------------------------------------------------------------------------------
def mib(n: int) -> str:
    return f"{n / 2**20:.0f}" if n else "-"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def table(points: list[Point]) -> str:
    header = ["sweep", "point", "unit", "ours", "reference", "ours / ref", "peak MiB ours", "peak MiB ref",
              "ours / ref (memory)", "agreement"]
    rows = []
    for p in points:
        model, label, unit = SWEEPS[p.sweep][:3]
        o, r = p.seconds["ours"], p.seconds["ref"]
        rows.append([p.sweep, f"{label.split(' ')[0]} {p.x}", unit, f"{o:.3f}", f"{r:.3f} ({REFERENCE[model]})",
                     ratio(o, r), mib(p.peak["ours"]), mib(p.peak["ref"]), ratio(p.peak["ours"], p.peak["ref"]),
                     p.agreement])
    return markdown_table(header, rows)


def plot(points: list[Point], path: Path, title: str) -> None:
    """One column a sweep: time (top) and peak memory (bottom), ours and the reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = list(dict.fromkeys(p.sweep for p in points))
    fig, axes = plt.subplots(2, len(sweeps), figsize=(3.2 * len(sweeps), 5.4), squeeze=False)
    for col, sweep in enumerate(sweeps):
        model, label, unit = SWEEPS[sweep][:3]
        mine = [p for p in points if p.sweep == sweep]
        xs = [p.x for p in mine]
        for side, style in (("ours", "o-"), ("ref", "s--")):
            name = "ours" if side == "ours" else REFERENCE[model]
            axes[0, col].plot(xs, [p.seconds[side] for p in mine], style, label=name)
            axes[1, col].plot(xs, [p.peak[side] / 2**20 for p in mine], style, label=name)
        axes[0, col].set_title(sweep, fontsize=9)
        axes[0, col].set_ylabel(unit, fontsize=8)
        axes[1, col].set_ylabel("peak MiB", fontsize=8)
        axes[1, col].set_xlabel(label, fontsize=8)
        for ax in axes[:, col]:
            ax.set_xticks(xs)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=7)
            ax.set_ylim(bottom=0)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def run(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    size = "tiny" if args.tiny else "mid"
    column = 5 if args.tiny else 4 if args.full else 3
    diffusers_logging.set_verbosity_error()
    start = time.perf_counter()
    header = f"{size}-size models, fp32, CPU; {machine_line(torch.device('cpu'))}"
    print(f"# scaling: {header}", flush=True)
    points: list[Point] = []
    for model, runner in (("sd", run_sd), ("blip2", run_blip2)):
        mine = {s: SWEEPS[s][column] for s in args.sweeps if SWEEPS[s][0] == model}
        if mine:
            points += runner(args, size, mine)
    text = table(points)
    footer = f"# finished in {time.perf_counter() - start:.0f} s; {machine_line(torch.device('cpu'))}"
    print(text + "\n" + footer)
    if args.out:
        Path(args.out).write_text(f"<!-- {header} -->\n{text}\n<!-- {footer.removeprefix('# ')} -->\n")
    if args.plot:
        plot(points, Path(args.plot), f"ours vs references, {header}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("benchmarks.scaling", run, argv)


if __name__ == "__main__":
    sys.exit(main())
