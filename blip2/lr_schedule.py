"""Learning-rate multiplier of LAVIS' ``linear_warmup_cosine_lr``, per optimizer step, for
``torch.optim.lr_scheduler.LambdaLR`` (the lr at step n is ``learning_rate * f(n)``).

LAVIS warms up linearly from ``warmup_lr`` to ``init_lr`` over ``warmup_steps`` and then follows
``min_lr + (init_lr - min_lr) * (1 + cos(pi * epoch / max_epoch)) / 2`` epoch by epoch; here the
cosine runs step by step over ``max_steps`` (the BLIP-2 paper: "cosine learning rate decay"). The
start and floor are fractions of the peak, so the schedule follows main.py's scaled learning rate:
BLIP-2 stage 1 (init 1e-4, warm-up from 1e-6, min 1e-5) is ``f_start=0.01``, ``f_min=0.1``.
"""
from __future__ import annotations

import math


class LinearWarmupCosine:
    """f(n): ``f_start -> 1`` linearly over ``warm_up_steps``, then ``1 -> f_min`` along a half
    cosine that reaches ``f_min`` at ``max_steps`` (and stays there)."""

    def __init__(self, warm_up_steps: int = 5000, max_steps: int = 250000, f_start: float = 0.01,
                 f_min: float = 0.1):
        if not 0 <= warm_up_steps < max_steps:
            raise ValueError(f"LinearWarmupCosine: expected 0 <= warm_up_steps < max_steps, got "
                             f"warm_up_steps={warm_up_steps}, max_steps={max_steps}")
        self.warm_up_steps, self.max_steps = int(warm_up_steps), int(max_steps)
        self.f_start, self.f_min = float(f_start), float(f_min)

    def __call__(self, n: int) -> float:
        if n < self.warm_up_steps:
            return self.f_start + (1.0 - self.f_start) * n / self.warm_up_steps
        progress = min(n, self.max_steps) / self.max_steps
        return self.f_min + (1.0 - self.f_min) * 0.5 * (1.0 + math.cos(math.pi * progress))
