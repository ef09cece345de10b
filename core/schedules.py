"""Learning-rate schedules of every system, as multipliers f of the peak learning rate.

- ``LambdaLinearScheduler``: CompVis's per-step shape (``ldm.lr_scheduler`` in their configs), for
  ``torch.optim.lr_scheduler.LambdaLR``: the learning rate at optimizer step ``n`` is
  ``learning_rate * f(n)``. ``model.params.scheduler_config`` names it.
- ``LinearWarmupCosine``: LAVIS's ``linear_warmup_cosine_lr``, per step or per epoch (see there).

Attributes are plain numbers and lists: ``LambdaLR.state_dict()`` stores them in checkpoints,
which are read back with ``weights_only=True``.
"""
from __future__ import annotations

import bisect
import math
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


class LinearWarmupCosine:
    """LAVIS's ``linear_warmup_cosine_lr`` as a multiplier f(n, epoch) of the peak learning rate.

    Warm-up: ``f_start -> 1`` linearly over ``warm_up_steps`` optimizer steps. Then a half cosine
    ``1 -> f_min``, in one of LAVIS's two shapes:

    - per step (``max_steps``; BLIP-2 pre-training, "cosine learning rate decay"):
      f(n) = f_min + (1 - f_min) (1 + cos(pi min(n, max_steps) / max_steps)) / 2 once n >= warm_up_steps;
    - per epoch (``max_epochs``; LAVIS's runner, used for fine-tuning): during epoch 0 the warm-up,
      capped at 1; from epoch e >= 1, f = f_min + (1 - f_min) (1 + cos(pi e / max_epochs)) / 2,
      constant within the epoch.

    Start and floor are fractions of the peak, so the schedule follows main.py's scaled learning
    rate: LAVIS's init 1e-4, warm-up from 1e-6, min 1e-5 is ``f_start=0.01``, ``f_min=0.1``. f is a
    pure function of the progress: a resumed run continues it without saved state.
    """

    def __init__(self, warm_up_steps: int = 5000, max_steps: int | None = None, f_start: float = 0.01,
                 f_min: float = 0.1, max_epochs: int | None = None):
        if (max_steps is None) == (max_epochs is None):
            raise ValueError(f"LinearWarmupCosine: expected one of max_steps (a per-step cosine) or max_epochs "
                             f"(per epoch), got max_steps={max_steps}, max_epochs={max_epochs}")
        if max_steps is not None and not 0 <= warm_up_steps < max_steps:
            raise ValueError(f"LinearWarmupCosine: expected 0 <= warm_up_steps < max_steps, got "
                             f"warm_up_steps={warm_up_steps}, max_steps={max_steps}")
        if max_epochs is not None and max_epochs < 1:
            raise ValueError(f"LinearWarmupCosine: expected max_epochs >= 1 (the cosine is per epoch: set "
                             f"lightning.trainer.max_epochs), got max_epochs={max_epochs}")
        self.warm_up_steps = int(warm_up_steps)
        self.max_steps = None if max_steps is None else int(max_steps)
        self.max_epochs = None if max_epochs is None else int(max_epochs)
        self.f_start, self.f_min = float(f_start), float(f_min)

    def warm_up(self, n: int) -> float:
        return self.f_start + (1.0 - self.f_start) * n / max(self.warm_up_steps, 1)

    def cosine(self, progress: float) -> float:
        return self.f_min + (1.0 - self.f_min) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def __call__(self, n: int, epoch: int = 0) -> float:
        """f at optimizer step ``n`` (counted from the start of training), in epoch ``epoch``."""
        if self.max_steps is not None:
            return self.warm_up(n) if n < self.warm_up_steps else self.cosine(min(n, self.max_steps) / self.max_steps)
        return min(1.0, self.warm_up(n)) if epoch == 0 else self.cosine(epoch / self.max_epochs)
