"""Learning-rate multipliers for ``torch.optim.lr_scheduler.LambdaLR`` (CompVis ``ldm.lr_scheduler``).

``model.params.scheduler_config`` names one; ``DDPM.configure_optimizers`` wraps it in a per-step
``LambdaLR``, so the learning rate at optimizer step ``n`` is ``learning_rate * f(n)``.
Attributes are plain numbers and lists: ``LambdaLR.state_dict()`` stores them in checkpoints,
which are read back with ``weights_only=True``.
"""
from __future__ import annotations

import bisect
from typing import Sequence


class LambdaLinearScheduler:
    """Cycles of a linear warm-up ``f_start -> f_max`` over ``warm_up_steps`` then a linear ramp
    ``f_max -> f_min`` over the rest of the cycle (the sd-v1 training configs use one cycle,
    ``warm_up_steps [10000]``, ``f_start [1e-6]``, ``f_max [1.0]``, ``f_min [1.0]``)."""

    def __init__(self, warm_up_steps: Sequence[int], f_min: Sequence[float], f_max: Sequence[float],
                 f_start: Sequence[float], cycle_lengths: Sequence[int], verbosity_interval: int = 0):
        lists = {"warm_up_steps": warm_up_steps, "f_min": f_min, "f_max": f_max, "f_start": f_start,
                 "cycle_lengths": cycle_lengths}
        if len({len(v) for v in lists.values()}) != 1:
            raise ValueError("LambdaLinearScheduler: expected lists of one length (one entry per cycle), got "
                             + ", ".join(f"{k}={list(v)}" for k, v in lists.items()))
        self.warm_up_steps = [int(v) for v in warm_up_steps]
        self.f_min, self.f_max = [float(v) for v in f_min], [float(v) for v in f_max]
        self.f_start = [float(v) for v in f_start]
        self.cycle_lengths = [int(v) for v in cycle_lengths]
        self.cycle_ends = [sum(self.cycle_lengths[:i + 1]) for i in range(len(self.cycle_lengths))]
        self.verbosity_interval = int(verbosity_interval)

    def __call__(self, n: int) -> float:
        """f(n): the learning-rate multiplier at optimizer step ``n`` (a cycle's last step ``n =
        end`` still belongs to it, as in CompVis)."""
        c = min(bisect.bisect_left(self.cycle_ends, n), len(self.cycle_ends) - 1)
        n = n - (self.cycle_ends[c] - self.cycle_lengths[c])
        warm, length = self.warm_up_steps[c], self.cycle_lengths[c]
        if n < warm:
            f = self.f_start[c] + (self.f_max[c] - self.f_start[c]) * n / warm
        else:
            f = self.f_min[c] + (self.f_max[c] - self.f_min[c]) * (length - n) / length
        if self.verbosity_interval > 0 and n % self.verbosity_interval == 0:
            print(f"lr multiplier at step {n} of cycle {c}: {f:.3g}")
        return f
