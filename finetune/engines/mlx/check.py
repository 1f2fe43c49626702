"""The logits `ft fuse` checks before writing, on the MLX engine's own modules (the adapter model
is the base plus the unfused LoRA path: an independent computation of the fused weights)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import mlx.core as mx
import numpy as np

from finetune.core import dtypes
from finetune.core.quantization import Params
from finetune.engines.mlx import lora as lora_modules
from finetune.engines.mlx import quantized
from finetune.engines.mlx.model import build
from finetune.files.weights import mlx_arrays

Tensors = Mapping[str, np.ndarray]
Pairs = Mapping[str, tuple[np.ndarray, np.ndarray]]


def logits(config: Mapping[str, Any], rows: Sequence[Sequence[int]], base: Tensors, plan: Mapping[str, Params],
           pairs: Pairs, scale: float, variants: Iterable[Tensors], variant_plan: Mapping[str, Params],
           ) -> tuple[list[np.ndarray], list[np.ndarray], list[list[np.ndarray]]]:
    """`ft fuse`'s check on our modules: (base, adapter, one list per variant) float32 logits
    `(T, vocab)` per row; quantized layers (`plan`, `variant_plan`) as mlx-lm runs them."""
    def model_of(tensors: Tensors, plan: Mapping[str, Params]):
        model = build(config)
        quantized.apply(model, dict(plan))
        floats = dtypes.cast_floats(tensors, "float32")
        model.load_weights(list(mlx_arrays(floats).items()), strict=True)
        model.eval()
        return model

    def run(model) -> list[np.ndarray]:
        out = [model(mx.array([list(row)]))[0].astype(mx.float32) for row in rows]  # (T, vocab) each
        mx.eval(out)
        return [np.array(x) for x in out]

    model = model_of(base, plan)
    plain = run(model)
    factors = {f"{p}.{leaf}": x for p, ab in pairs.items() for leaf, x in zip(("lora_a", "lora_b", "m")[:len(ab)], ab, strict=True)}
    lora_modules.attach(model, mlx_arrays(dtypes.cast_floats(factors, "float32")), scale)
    adapted = run(model)
    del model  # one model in memory at a time
    return plain, adapted, [run(model_of(v, variant_plan)) for v in variants]
