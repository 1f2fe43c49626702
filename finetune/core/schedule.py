"""Learning-rate schedules: pure functions of the optimizer step, written once for every engine.

The formula takes its array operations from a namespace (`xp`): NumPy for the torch engine,
`mlx.core` for the MLX engine, whose optimizers trace the schedule inside the compiled step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from finetune.core.config import TrainingConfig

Schedule = Callable[[Any], Any]


def build(cfg: TrainingConfig, total_steps: int, xp: Any = np) -> Schedule:
    """Linear warmup to `learning_rate`, then constant, linear or cosine decay.

    `step` counts updates already applied (0 for the first), as MLX's optimizers pass it.
    Warmup update k (1-based) uses k/warmup of the peak; decay then runs from the peak towards
    `min_learning_rate`, which the update after the last would reach: every step moves weights.
    Arithmetic is float32 in either namespace, so both engines see the same numbers.
    """
    peak, floor, warmup = cfg.learning_rate, cfg.min_learning_rate, cfg.warmup
    decay_steps = max(1, total_steps - warmup)
    kind = cfg.schedule

    def lr(step: Any) -> Any:
        s = xp.array(step).astype(xp.float32) + 1.0  # the update being made, 1-based
        ramp = xp.minimum(s / warmup, 1.0) if warmup else xp.array(1.0, xp.float32)
        progress = xp.clip((s - 1.0 - warmup) / decay_steps, 0.0, 1.0)
        if kind == "cosine":
            decayed = floor + (peak - floor) * 0.5 * (1.0 + xp.cos(math.pi * progress))
        elif kind == "linear":
            decayed = peak + (floor - peak) * progress
        else:
            decayed = xp.array(peak, xp.float32)
        return xp.where(s <= warmup, peak * ramp, decayed)

    return lr
