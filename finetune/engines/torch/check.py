"""The logits `ft fuse` checks before writing, on transformers' model for the same config (the
adapter model is the base plus the unfused LoRA path: an independent computation of the fused
weights)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.initialization import no_init_weights

from finetune.core import dtypes, lora
from finetune.core.convert import is_other, mlx_to_hf
from finetune.core.quantization import Params

Tensors = Mapping[str, np.ndarray]
Pairs = Mapping[str, tuple[np.ndarray, np.ndarray]]


def logits(config: Mapping[str, Any], rows: Sequence[Sequence[int]], base: Tensors, plan: Mapping[str, Params],
           pairs: Pairs, scale: float, variants: Iterable[Tensors], variant_plan: Mapping[str, Params],
           ) -> tuple[list[np.ndarray], list[np.ndarray], list[list[np.ndarray]]]:
    """`ft fuse`'s check on transformers' model for the same config: (base, adapter, one list per
    variant) float32 logits `(T, vocab)` per row; the LoRA path runs as forward hooks."""
    assert not plan and not variant_plan, "quantized layers are checked by the MLX engine"
    settings = {k: v for k, v in config.items() if k != "model_type"}
    with no_init_weights():  # every parameter is loaded below; buffers are built in __init__
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config["model_type"], **settings))
    model.tie_weights()
    model = model.float().eval()
    kind = config["model_type"]

    def load(tensors: Tensors) -> None:
        hf = mlx_to_hf(kind, config, tensors)
        with torch.no_grad():
            for name, p in model.named_parameters():  # tied weights appear once
                if not is_other(kind, name):  # a vision tower and projector: text rows never run them
                    p.copy_(torch.from_numpy(_writable(hf[name])))

    def run() -> list[np.ndarray]:
        with torch.no_grad():
            return [model(input_ids=torch.tensor([list(row)])).logits[0].float().numpy() for row in rows]

    def hook(path: str, a: np.ndarray, b: np.ndarray, *m: np.ndarray):
        a_t, b_t = (torch.from_numpy(_writable(x)) for x in (a, b))
        if not m:
            return lambda _module, inputs, out: out + scale * ((inputs[0] @ a_t) @ b_t)
        # DoRA: the update added, then each output row rescaled to m / ‖W + scale·(AB)ᵀ‖ (bias apart)
        adapted = dtypes.as_float32(base[f"{path}.weight"]) + lora.delta(dtypes.as_float32(a), dtypes.as_float32(b), np.float32(scale))
        ratio = torch.from_numpy(_writable(dtypes.as_float32(m[0]) / np.linalg.norm(adapted, axis=1)))

        def dora(module, inputs, out):
            bias = 0.0 if module.bias is None else module.bias
            return ratio * (out - bias + scale * ((inputs[0] @ a_t) @ b_t)) + bias

        return dora

    load(base)
    plain = run()
    handles = [model.get_submodule(p).register_forward_hook(hook(p, *ab)) for p, ab in pairs.items()]
    adapted = run()
    for h in handles:
        h.remove()
    out = []
    for v in variants:
        load(v)
        out.append(run())
    return plain, adapted, out


def _writable(x: np.ndarray) -> np.ndarray:
    """float32, contiguous and writable (torch refuses read-only memory-mapped arrays), copied only if needed."""
    return np.require(dtypes.as_float32(x), np.float32, ["C_CONTIGUOUS", "WRITEABLE"])
