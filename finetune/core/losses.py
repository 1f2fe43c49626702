"""Losses over supervised tokens only (pure MLX)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def supervised_ce(
    model: nn.Module,
    inputs: mx.array,
    select: mx.array,
    targets: mx.array,
    weights: mx.array,
    segments: mx.array | None = None,
    positions: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """(Σ cross-entropy, number of targets) over the selected positions.

    The LM head runs only where a target is supervised: `select` holds flat indices into
    `inputs` (B*T), `targets` the next tokens there, `weights` 1 (0 for the padding of
    `select` itself). Padding tokens of `inputs` are never targets.
    """
    h = model.hidden(inputs, segments, positions)  # (B, T, D)
    h = h.reshape(-1, h.shape[-1])[select]  # (N, D)
    logits = model.head(h).astype(mx.float32)  # (N, V)
    ce = nn.losses.cross_entropy(logits, targets, reduction="none")  # (N,)
    return (ce * weights).sum(), weights.sum()
