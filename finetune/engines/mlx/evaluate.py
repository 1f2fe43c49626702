"""The MLX engine's side of evaluation: batched greedy decoding with a KV cache (left-padded rows
at their own positions)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import numpy as np

from finetune.core.evaluation import Done, extend_answers


def greedy(model: Any, prompts: Sequence[Sequence[int]], max_tokens: int, stop_ids: Sequence[int],
           done: Done, pad_id: int = 0) -> list[list[int]]:
    """Greedy tokens after each prompt, decoded together: prompts are left-padded, the padding
    masked, and every row keeps the positions it would have alone. A row ends at a stop id (not
    kept), when `done` says so, or after `max_tokens`."""
    width = max(len(p) for p in prompts)
    pads = [width - len(p) for p in prompts]
    ids = np.array([[pad_id] * n + list(p) for n, p in zip(pads, prompts, strict=True)], dtype=np.int32)
    mask = (np.arange(width)[None] >= np.array(pads)[:, None]).astype(np.int32)  # (B, T)
    positions = np.maximum(np.arange(width)[None] - np.array(pads)[:, None], 0)  # (B, T)
    cache = model.make_cache()
    logits = _last_logits(model, mx.array(ids), mx.array(mask), cache, mx.array(positions))
    out: list[list[int]] = [[] for _ in prompts]
    active = [True] * len(prompts)
    stops = frozenset(stop_ids)
    step_positions = positions[:, -1:]
    for _ in range(max_tokens):
        tokens = mx.argmax(logits, axis=-1).tolist()  # (B,)
        if not extend_answers(out, active, tokens, stops, done):
            break
        mask = np.concatenate([mask, np.ones((len(prompts), 1), np.int32)], axis=1)
        step_positions = step_positions + 1
        logits = _last_logits(model, mx.array(tokens, dtype=mx.int32)[:, None], mx.array(mask), cache,
                              mx.array(step_positions))
    return out


def _last_logits(model: Any, ids: mx.array, mask: mx.array, cache: list, positions: mx.array) -> mx.array:
    h = model.backbone(ids, mask, cache, positions=positions)  # (B, T, D)
    logits = model.head(h[:, -1])  # (B, V)
    mx.eval(logits)
    return logits


