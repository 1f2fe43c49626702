"""The logits `ft fuse` checks before writing, run by one engine's own libraries.

MLX: our modules (`finetune.engines.mlx.model`), quantized layers as mlx-lm runs them. torch: the
transformers model for the same config. Either way the adapter model is the base plus the unfused
LoRA path (`y = W x + scale · (x A) B`), so the check compares the NumPy-fused weights against an
independent computation. Each engine is imported only when chosen.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from finetune.core import dtypes, lora
from finetune.core.convert import is_other, mlx_to_hf
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
    run = _mlx if engine == "mlx" else _torch
    return run(without_quantization(config), rows, base, plan, pairs, scale, variants, variant_plan)


def _mlx(config, rows, base, plan, pairs, scale, variants, variant_plan):
    import mlx.core as mx

    from finetune.engines.mlx import lora as lora_modules
    from finetune.engines.mlx import quantized
    from finetune.engines.mlx.model import build
    from finetune.shell.export.adapters import mlx_arrays

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


def _torch(config, rows, base, plan, pairs, scale, variants, variant_plan):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

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
