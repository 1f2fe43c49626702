"""The MLX engine's side of evaluation: load once, swap adapters, batched greedy decoding with a
KV cache (left-padded rows at their own positions), the trainer's teacher-forced loss."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_unflatten
from returns.result import Result, Success

from finetune.core.config import Recipe
from finetune.core.evaluation import Done, extend_answers
from finetune.core.tokenize import Tokens


def load(spec: str, device: str | None, why: str = "") -> tuple[Any, Any, str]:
    """(model, tokenizer, backend line) of the base model, on `device`."""
    from finetune.engines.mlx import device as backend
    from finetune.engines.mlx.load import load_model
    from finetune.errors import unwrap

    info = backend.select(device)
    model, tokenizer = unwrap(load_model(spec))
    return model, tokenizer, backend.describe(info, why)


def needs_own_base(adapter: str) -> bool:
    """The adapter was trained on a quantized base: it gets that base loaded for it alone."""
    from finetune.shell.export.adapters import base_quantization

    return base_quantization(adapter).value_or(None) is not None


def load_with(spec: str, adapter: str) -> Result[Any, str]:
    """The base rebuilt as the adapter records it (quantized), with the adapter attached."""
    from finetune.engines.mlx.load import load_model

    return load_model(spec, adapter=adapter).map(lambda pair: pair[0])


def swap(model: Any, adapter: str | None) -> Result[Any, str]:
    """`model` with its LoRA layers removed, then `adapter` (if any) attached: the base stays loaded."""
    from finetune.engines.mlx.lora import LoRALinear
    from finetune.shell.export.adapters import attach

    plain = [(name, m.linear) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    if plain:
        model.update_modules(tree_unflatten(plain))
    if adapter is None:
        return Success(model)
    return attach(model, adapter).map(lambda m: m.eval())


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


def loss(model: Any, tokens: list[Tokens], recipe: Recipe) -> float:
    """The trainer's token-weighted loss on these rows (teacher-forced, supervised tokens only)."""
    from finetune.engines import rundir
    from finetune.engines.mlx import step as trainer

    value = trainer.evaluate(model, rundir.data(tokens, recipe), recipe.train.max_seq_length, -1)
    model.eval()  # evaluate leaves the model in training mode (dropout on)
    return value
