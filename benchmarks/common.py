"""Timing helpers shared by the side-by-side benchmarks: interleaved runs, medians, a markdown table.

Each side is warmed up, then the sides take turns (A B, B A, A B, ...) so slow drifts of the machine
(thermal state, other processes) fall on both alike; a side's figure is the median of its repeats.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from core.config import DTYPES  # noqa: F401  (re-exported: the --dtype names of every benchmark)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so a wall-clock reading covers the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Seconds per repeat of one side, its last result, and (on CUDA) its peak extra memory in bytes."""

    seconds: list[float] = field(default_factory=list)
    result: Any = None
    peak_bytes: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def timed_call(fn: Callable[[], Any], device: torch.device, timing: Timing) -> None:
    """Run fn once; record its wall time, its result and the memory it needed above what was held."""
    synchronize(device)
    if device.type == "cuda":
        held = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    timing.result = fn()
    synchronize(device)
    timing.seconds.append(time.perf_counter() - start)
    if device.type == "cuda":
        timing.peak_bytes = max(timing.peak_bytes, torch.cuda.max_memory_allocated(device) - held)


def interleaved(sides: dict[str, Callable[[], Any]], device: torch.device, warmup: int,
                repeats: int) -> dict[str, Timing]:
    """Warm every side up, then time `repeats` runs of each, alternating the order every round."""
    for fn in sides.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    timings = {name: Timing() for name in sides}
    names = list(sides)
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            timed_call(sides[name], device, timings[name])
    return timings


def paired_ratio(ours: Timing, ref: Timing) -> float:
    """The median over rounds of ours / ref within a round: ``interleaved`` runs the sides back to back,
    so a drift of the machine between rounds cancels out (the ratio of the medians keeps it)."""
    return statistics.median(o / r for o, r in zip(ours.seconds, ref.seconds, strict=True))


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def machine_line(device: torch.device) -> str:
    """Where the figures were taken: accelerator or CPU threads, and the load average."""
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"CPU, {torch.get_num_threads()} threads"
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return f"{where}; torch {torch.__version__}; load average {load}"
