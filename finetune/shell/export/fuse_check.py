"""The logits `ft fuse` checks before writing, run by one engine's own libraries.

MLX: our modules (`engines/mlx/check.py`), quantized layers as mlx-lm runs them. torch: the
transformers model for the same config (`engines/torch/check.py`). Either way the adapter model is
the base plus the unfused LoRA path (`y = W x + scale · (x A) B`), so the check compares the
NumPy-fused weights against an independent computation. Each engine is imported only when chosen.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from finetune.core.quantization import Params, without_quantization

Tensors = Mapping[str, np.ndarray]
Pairs = Mapping[str, tuple[np.ndarray, np.ndarray]]


def logits(
    engine: str, config: Mapping[str, Any], rows: Sequence[Sequence[int]], base: Tensors, plan: Mapping[str, Params],
    pairs: Pairs, scale: float, variants: Iterable[Tensors], variant_plan: Mapping[str, Params],
) -> tuple[list[np.ndarray], list[np.ndarray], list[list[np.ndarray]]]:
    """(base, adapter, one list per variant) float32 logits `(T, vocab)` per row.

    `base` (our names; `plan`'s layers quantized as stored) runs with and without the LoRA
    `pairs`; each of `variants` (`variant_plan`'s layers quantized) runs plain, one at a time
    (a generator of them holds one in memory).
    """
    from finetune import engines

    return engines.get(engine).check_logits(without_quantization(config), rows, base, plan, pairs, scale, variants,
                                            variant_plan)


