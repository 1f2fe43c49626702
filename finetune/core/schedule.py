"""Learning-rate schedules: pure functions of the optimizer step (traceable by MLX)."""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx

from finetune.core.config import TrainingConfig

Schedule = Callable[[mx.array], mx.array]


def build(cfg: TrainingConfig, total_steps: int) -> Schedule:
    """Linear warmup to `learning_rate`, then constant, linear or cosine decay.

    `step` counts updates already applied (0 for the first), as MLX's optimizers pass it.
    Warmup update k (1-based) uses k/warmup of the peak; decay then runs from the peak towards
    `min_learning_rate`, which the update after the last would reach: every step moves weights.
    """
    peak, floor, warmup = cfg.learning_rate, cfg.min_learning_rate, cfg.warmup
    decay_steps = max(1, total_steps - warmup)
    kind = cfg.schedule

    def lr(step: mx.array) -> mx.array:
        s = step.astype(mx.float32) + 1.0  # the update being made, 1-based
        ramp = mx.minimum(s / warmup, 1.0) if warmup else mx.array(1.0)
        progress = mx.clip((s - 1.0 - warmup) / decay_steps, 0.0, 1.0)
        if kind == "cosine":
            decayed = floor + (peak - floor) * 0.5 * (1.0 + mx.cos(math.pi * progress))
        elif kind == "linear":
            decayed = peak + (floor - peak) * progress
        else:
            decayed = mx.array(peak)
        return mx.where(s <= warmup, peak * ramp, decayed)

    return lr
