"""Fusing LoRA into base weights (pure): merges, dequantization, the written config and shards,
and the check that the fused model still computes what the adapter model computes.

The check compares logits of four models on a few rows: the base (float32), the adapter model
(base + unfused LoRA, float32), the base with its weights rounded to the output dtype, and the
fused model as it will be stored (computed in float32, so only the stored values differ). With no
engine installed to run a model, the same measures are taken on the fused layers' weights.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from msgspec import Struct
from returns.result import Failure, Result, Success

from finetune.core import affine, dtypes, lora
from finetune.core.convert import SUPPORTED, mlx_to_hf, older_names, stored_names
from finetune.core.quantization import Params, Quant, without_quantization
from finetune.core.records import Sample

DTYPES = dtypes.FLOATS
# Logit tolerance per output dtype, relative to the largest logit (at least 1).
RTOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
EPS32 = float(np.finfo(np.float32).eps)
# The adapter's effect "vanished" when fusing keeps less than this share of it.
VANISHED = 0.5
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_SHARD = "2GB"


def dequantize(weights: Mapping[str, np.ndarray], plan: Mapping[str, Params]) -> dict[str, np.ndarray]:
    """Every planned quantized `<path>.weight` (with `.scales`, `.biases`; affine mode) as a dense
    float32 matrix; other tensors as they are."""
    out = dict(weights)
    for path, p in plan.items():
        assert p.mode == "affine", f"{path}: only affine quantization is dequantized with NumPy"
        scales, biases = out.pop(f"{path}.scales"), out.pop(f"{path}.biases")
        out[f"{path}.weight"] = affine.dequantize(weights[f"{path}.weight"], scales, biases, p.group_size, p.bits)
    return out


def fuse_all(
    weights: Mapping[str, np.ndarray], pairs: Mapping[str, tuple[np.ndarray, ...]], scale: float
) -> dict[str, np.ndarray]:
    """`<path>.weight` replaced by `W + scale · (A B)ᵀ` (in float32) for every LoRA pair `(A, B)`;
    a DoRA triple `(A, B, m)` also rescales each output row to its magnitude: `m · W' / ‖W'‖_row`
    (the bias is left alone, as DoRA's forward leaves it)."""
    out = dict(weights)
    for path, (a, b, *m) in pairs.items():
        fused = lora.delta(dtypes.as_float32(a), dtypes.as_float32(b), np.float32(scale))
        fused += dtypes.as_float32(weights[f"{path}.weight"])
        if m:
            fused *= (dtypes.as_float32(m[0]) / np.linalg.norm(fused, axis=1))[:, None]
        out[f"{path}.weight"] = fused
    return out


def hf_tensors(model_type: str, config: Mapping[str, Any], weights: Mapping[str, np.ndarray],
               like: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Our weights -> the tensors of a HF checkpoint (Conv1D transposed back for GPT-2), spelled as
    the base checkpoint whose keys are `like` spells them (Gemma 3's `language_model.model.`).

    A tied GPT-2 gets bare names (`h.0.attn.c_attn.weight`, as in the hub's `gpt2`): transformers
    reads both, mlx-lm only those.
    """
    hf = stored_names(model_type, mlx_to_hf(model_type, config, weights), like)
    if model_type == "gpt2" and "lm_head.weight" not in hf:
        return {k.removeprefix("transformer."): v for k, v in hf.items()}
    return hf


def fused_config(config: Mapping[str, Any], dtype: str, quant: Quant | None = None) -> dict[str, Any]:
    """The written config.json: the dtype fields updated, the quantization `quant` (mlx-lm writes
    it under both names) or none.

    Fields transformers 5 no longer writes but mlx-lm still reads are added back from their new
    homes: a top-level `rope_theta` (from `rope_parameters`) and GPT-2's `n_ctx` (= n_positions).
    """
    out = without_quantization(config)
    if quant is not None:  # per-layer entries named as mlx-lm names the modules
        out["quantization"] = out["quantization_config"] = mlx_names_of(out.get("model_type"), quant.as_config())
    out["dtype"] = dtype
    if "torch_dtype" in out:
        out["torch_dtype"] = dtype
    rope = out.get("rope_parameters")
    if isinstance(rope, Mapping) and "rope_theta" in rope and "rope_theta" not in out:
        out["rope_theta"] = rope["rope_theta"]
    if out.get("model_type") == "gpt2" and "n_ctx" not in out and "n_positions" in out:
        out["n_ctx"] = out["n_positions"]
    return out


def mlx_names_of(model_type: Any, block: dict[str, Any]) -> dict[str, Any]:
    """A quantization block's per-layer entries under mlx-lm's module names (Gemma 3's `language_model.model.`)."""
    return older_names(model_type, block) if model_type in SUPPORTED else block


def parse_size(text: str) -> Result[int, str]:
    """`2GB`, `500MB`, `1.5GiB`, `1000000` -> bytes (KB/MB/GB are powers of 10, KiB... of 2)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", text, flags=re.IGNORECASE)
    if m is None:
        return Failure(f"--max-shard-size: expected a size like 2GB, 500MB or a byte count, got {text!r}")
    unit = (m.group(2) or "B").upper()
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    base = 1024 if unit.endswith("IB") else 1000
    size = int(float(m.group(1)) * base**power)
    return Success(size) if size > 0 else Failure("--max-shard-size must be more than 0 bytes")


def shard_plan(sizes: Mapping[str, int], max_bytes: int) -> list[list[str]]:
    """Tensor names in order, cut into shards of at most `max_bytes` (a larger tensor alone)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def shard_names(count: int) -> list[str]:
    """`model.safetensors`, or `model-0000i-of-0000n.safetensors` for n > 1 shards."""
    if count == 1:
        return [SINGLE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def index_json(plan: Sequence[Sequence[str]], sizes: Mapping[str, int]) -> dict[str, Any]:
    """`model.safetensors.index.json` for a shard plan."""
    files = shard_names(len(plan))
    weight_map = {name: files[i] for i, shard in enumerate(plan) for name in shard}
    return {"metadata": {"total_size": sum(sizes.values())}, "weight_map": dict(sorted(weight_map.items()))}


def sample_text(sample: Sample) -> str:
    """A data row as plain text for the check (its template does not matter there)."""
    if sample.text:
        return sample.text
    parts = [m.content for m in sample.messages]
    if sample.input:
        parts.insert(1, sample.input)
    return "\n".join(p for p in parts if p)


class Check(Struct, frozen=True, kw_only=True):
    """Largest absolute logit differences measured on the check rows (or weight differences on the
    fused layers, `on == "weights"`)."""

    rows: int
    dtype: str
    fused_vs_adapter: float  # fused model (as stored) vs base + unfused LoRA
    tolerance: float
    adapter_effect: float  # base + LoRA vs base
    fused_effect: float  # fused vs the base rounded to `dtype`: what survives of the adapter
    cast_noise: float  # the base rounded to `dtype` vs the base
    logit_scale: float  # largest |logit| of the adapter model
    kept: float  # share of the adapter's effect the fused model keeps (projection; 1 = all)
    quantized: str = ""  # the re-quantization of a quantized base's fused layers ("" = float output)
    on: str = "logits"  # or "weights": no engine ran the model

    @property
    def stored_as(self) -> str:
        return f"re-quantized ({self.quantized})" if self.quantized else f"in {self.dtype}"

    def summary(self) -> str:
        where = f"{self.rows} rows" if self.on == "logits" else f"the weights of {self.rows} fused layers"
        return (f"check on {where}: fused vs adapter {self.on} max |diff| {self.fused_vs_adapter:.2e} "
                f"(tolerance {self.tolerance:.2e}); the adapter moves {self.on} by up to {self.adapter_effect:.2e}, "
                f"{self.fused_effect:.2e} after fusing {self.stored_as} ({self.kept:.0%} of its effect kept)")


def _top(so_far: float, x: np.ndarray) -> float:
    """The larger of `so_far` and max |x|; a NaN anywhere stays NaN (the verdict refuses it)."""
    return float(np.maximum(so_far, np.abs(x).max(initial=0.0)))


def measure(
    base: Iterable[np.ndarray], adapter: Iterable[np.ndarray], base_cast: Iterable[np.ndarray],
    fused: Iterable[np.ndarray], dtype: str, quantized: str = "", on: str = "logits",
) -> Check:
    """Compare the four models' logits (one array per row) and set the dtype's tolerance.

    One pass, one row of each at a time (so weights may be produced layer by layer). For
    re-quantized output (`quantized`), `base_cast` is the base with the same layers re-quantized
    (re-quantizing is not idempotent: that noise is the format's); quantizing the fused weights
    afresh adds more, so the fused model may also be as far from the adapter model as the base
    is, but no farther.
    """
    rows, scale, noise, effect_size, drift, fused_effect, norm, along = 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
    for b, a, c, f in zip(base, adapter, base_cast, fused, strict=True):
        b, a, c, f = (x.astype(np.float32, copy=False) for x in (b, a, c, f))
        effect, survived = a - b, f - c
        rows += 1
        scale, noise = _top(scale, a), _top(noise, c - b)
        effect_size, drift, fused_effect = _top(effect_size, effect), _top(drift, f - a), _top(fused_effect, survived)
        norm += float((effect * effect).sum())
        along += float((survived * effect).sum())
    return Check(
        rows=rows, dtype=dtype, fused_vs_adapter=drift,
        tolerance=RTOL[dtype] * max(1.0, scale) + 3.0 * noise + (effect_size if quantized else 0.0),
        adapter_effect=effect_size, fused_effect=fused_effect, cast_noise=noise, logit_scale=scale,
        kept=along / norm if norm > 0 else 1.0, quantized=quantized, on=on,
    )


def verdict(check: Check) -> Result[Check, str]:
    """Refuse a fused model whose adapter effect vanished or whose logits drift past tolerance."""
    hint = "; fuse with --dtype float32" if check.dtype != "float32" else ""
    if check.quantized:
        hint = "; fuse with --dequantize to keep it in float weights"
    if not math.isfinite(check.fused_vs_adapter + check.fused_effect):
        return Failure(f"the fused model's {check.on} are not finite in {check.dtype} (weights out of its range){hint}")
    # an effect beyond float32 noise: logits' relative tolerance; weights' (fused exactly) a few ulps
    floor = RTOL["float32"] * max(1.0, check.logit_scale) if check.on == "logits" else 4 * EPS32 * check.logit_scale
    significant = check.adapter_effect > floor
    if significant and check.kept < VANISHED:
        return Failure(
            f"the adapter's effect rounds away {check.stored_as}: the fused model's {check.on} differ from the "
            f"base model's by at most {check.fused_effect:.2e}, the adapter model's by {check.adapter_effect:.2e} "
            f"(only {max(check.kept, 0.0):.0%} of the adapter's effect survives; its LoRA update is tiny next to "
            f"the base weights){hint}"
        )
    if check.fused_vs_adapter > check.tolerance:
        return Failure(
            f"the fused model disagrees with the adapter model: max |{check.on.removesuffix('s')} difference| "
            f"{check.fused_vs_adapter:.2e} > tolerance {check.tolerance:.2e} {check.stored_as}{hint}"
        )
    return Success(check)
