"""The base side of `ft fuse`: a checkpoint read with NumPy into our names, how its layers are
quantized, its dense float32 weights, and re-quantizing. Affine quantization (mlx-lm's default)
is NumPy throughout; only the other modes import MLX, and only where they are used."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from msgspec import Struct
from returns.result import Failure, Result, Success

from finetune.core import affine, dtypes, fusing, quantization
from finetune.core.dtypes import BF16
from finetune.core.quantization import Params, Quant
from finetune.files import tensorfile, weights
from finetune.shell.export import adapters


class Base(Struct, frozen=True, kw_only=True):
    """The base checkpoint in our names (NumPy), with its quantized layers."""

    tensors: dict[str, np.ndarray]  # quantized layers packed as mlx-lm stores them
    plan: dict[str, Params]  # quantized module path -> how
    layers: dict[str, Params | None]  # every quantizable module (None = float)
    needs_mlx: str = ""  # why this base needs MLX ("" = it does not)
    others: dict[str, np.ndarray] = {}  # tensors outside the text model (Gemma 3's vision tower), as stored
    stored: tuple[str, ...] = ()  # the checkpoint's tensor names (how the fused model spells its own)


def read_checkpoint(directory: Path) -> Result[dict[str, np.ndarray], str]:
    """Every tensor of a HF model directory as NumPy arrays, shards merged."""
    from finetune.core.convert import merge_shards
    from finetune.files.torchbin import read_torch_bin_numpy

    match weights.checkpoint_files(directory):
        case Success(files):
            pass
        case failure:
            return failure
    shards = []
    for f in files:
        match read_torch_bin_numpy(f) if f.suffix == ".bin" else tensorfile.read(f):
            case Success(tensors):
                shards.append(tensors)
            case failure:
                return failure
    return merge_shards(shards).alt(lambda m: f"{directory}: {m}")


def read(directory: Path, config: dict, adapter: adapters.Adapter, spec: str) -> Result[Base, str]:
    """The base's tensors in our names and how its layers are quantized (as stored, or as the
    adapter records they were quantized on load)."""
    from finetune.core.convert import expected_shapes, hf_to_mlx, other_parts

    kind, plain = config["model_type"], quantization.without_quantization(config)
    shapes = expected_shapes(kind, plain)
    in_dims = {k.removesuffix(".weight"): s[-1] for k, s in shapes.items() if k.endswith(".weight") and len(s) == 2}
    stored = quantization.from_config(config).value_or(None)
    record = adapter.spec.base_quantization if adapter.spec else None
    match read_checkpoint(directory):
        case Success(raw):
            pass
        case failure:
            return failure
    if stored is not None:
        found = _quantized(quantization.mlx_names(kind, raw), stored, in_dims, shapes, spec)
    else:
        found = hf_to_mlx(kind, plain, raw).alt(lambda m: f"{spec}: {m}").bind(lambda t: _on_load(t, record, in_dims, spec))
    match found:
        case Success((tensors, plan)):
            pass
        case failure:
            return failure
    layers = {p: plan.get(p) for p in in_dims}
    want = quantization.parse_block(record, str(adapter.config_path)).value_or(None) if record else None
    digest = str(record.get(quantization.DIGEST, "")) if record else ""
    have = _digest(tensors, plan) if digest and all(tensors[f"{p}.weight"].dtype == np.uint32 for p in plan) else ""
    refusal = quantization.base_mismatch(want, quantization.describe(layers), str(adapter.directory), digest, have) if record else None
    if refusal:
        return Failure(refusal)
    on_load = bool(record and record.get(quantization.ON_LOAD))  # then quantizing is needed, else dequantizing
    needs = mlx_quantizes(plan if on_load else {p: q for p, q in plan.items() if q.mode != "affine"})
    return Success(Base(tensors=tensors, plan=plan, layers=layers, needs_mlx=needs, others=other_parts(kind, raw),
                        stored=tuple(raw)))


def _digest(tensors: Mapping[str, np.ndarray], plan: Mapping[str, Params]) -> str:
    """`quantization.codes_digest` of the packed layers, as the MLX loader computes it."""
    def raw(path: str) -> bytes:
        parts = [tensors[f"{path}.weight"], *(tensors[f"{path}.{leaf}"] for leaf in ("scales", "biases") if f"{path}.{leaf}" in tensors)]
        return b"".join(np.ascontiguousarray(p if p.dtype == np.uint32 else dtypes.cast_floats({"x": p}, "float32")["x"]).tobytes() for p in parts)

    return quantization.codes_digest({p: raw(p) for p in plan})


def _quantized(tensors: dict, quant: Quant, in_dims: dict, shapes: dict, spec: str) -> Result[tuple[dict, dict], str]:
    """An mlx-lm quantized checkpoint's tensors (our names) and plan, checked against its config."""
    packed = {k.removesuffix(".scales"): (tuple(tensors[k.removesuffix(".scales") + ".weight"].shape), tuple(v.shape))
              for k, v in tensors.items() if k.endswith(".scales") and k.removesuffix(".scales") + ".weight" in tensors}
    match quantization.stored_plan(quant, in_dims, packed, spec):
        case Success(plan):
            pass
        case failure:
            return failure
    extra = {f"{p}.{leaf}" for p in plan for leaf in ("scales", "biases")}
    unknown, missing = sorted(tensors.keys() - shapes.keys() - extra), sorted(shapes.keys() - tensors.keys())
    if unknown or missing:
        what = f"unknown keys {', '.join(unknown[:5])}" if unknown else f"missing keys {', '.join(missing[:5])}"
        return Failure(f"{spec}: quantized checkpoint does not match its config: {what}")
    for k, shape in shapes.items():
        if k.removesuffix(".weight") not in plan and tuple(tensors[k].shape) != tuple(shape):
            return Failure(f"{spec}: shape mismatch for {k}: expected {tuple(shape)}, got {tuple(tensors[k].shape)}")
    return Success((tensors, plan))


def _on_load(tensors: dict, record: Mapping[str, Any] | None, in_dims: dict, spec: str) -> Result[tuple[dict, dict], str]:
    """A float base as training saw it: quantized (with MLX) when the adapter records that."""
    from finetune.engines.choose import installed

    if not record or not record.get(quantization.ON_LOAD):
        return Success((tensors, {}))
    quant = quantization.parse_block(record, spec).value_or(None)
    match quantization.load_plan(quant, in_dims, "--quantize-group-size") if quant else Success({}):
        case Success(plan):
            pass
        case failure:
            return failure
    if mlx_quantizes(plan) and not installed("mlx"):  # refused by fuse, with the reason
        return Success((tensors, plan))
    return Success((requantize(dtypes.cast_floats(tensors, "float32"), {}, plan, set(plan)), plan))


def dense(base: Base) -> dict[str, np.ndarray]:
    """The base's weights in float32, quantized layers dequantized (affine with NumPy)."""
    affine = {p: q for p, q in base.plan.items() if q.mode == "affine"}
    out = fusing.dequantize(dtypes.cast_floats(base.tensors, "float32"), affine)
    if other := {p: q for p, q in base.plan.items() if q.mode != "affine"}:
        import mlx.core as mx

        for path, p in other.items():
            parts = [adapters.mlx_arrays({"x": out.pop(f"{path}.{leaf}")})["x"] if f"{path}.{leaf}" in out else None
                     for leaf in ("weight", "scales", "biases")]
            dense = mx.dequantize(*parts, group_size=p.group_size, bits=p.bits, mode=p.mode).astype(mx.float32)
            out[f"{path}.weight"] = np.array(dense)
    return dtypes.cast_floats(out, "float32")


def requantize(dense: Mapping[str, np.ndarray], packed: Mapping[str, np.ndarray], plan: Mapping[str, Params],
               changed: set[str]) -> dict[str, np.ndarray]:
    """`dense` with every planned module quantized again, as mlx-lm does: a `changed` one from its
    dense weight (affine with NumPy, bit-equal to mx.quantize; other modes with MLX), the others as
    they were stored (`packed`)."""
    out = dict(dense)
    for path, p in plan.items():
        names = [f"{path}.{leaf}" for leaf in ("weight", "scales", "biases")]
        if path not in changed:
            parts = [packed[n] for n in names if n in packed]
        elif not mlx_quantizes({path: p}):
            parts = list(affine.quantize(dense[f"{path}.weight"], p.group_size, p.bits))
        else:
            parts = _mx_quantize(dense[f"{path}.weight"], p)
        out.update(zip(names, parts, strict=False))
    return out


def mlx_quantizes(plan: Mapping[str, Params]) -> str:
    """Why quantizing `plan`'s layers needs MLX ("" = NumPy does it, bit for bit)."""
    if modes := sorted({p.mode for p in plan.values()} - {"affine"}):
        return f"{modes[0]} quantization is (de)quantized with MLX only (affine with NumPy)"
    if any(p.bits == 1 for p in plan.values()):
        return "1-bit affine quantization is MLX's only (2 to 8 bits with NumPy)"
    return ""


def _mx_quantize(weight: np.ndarray, p: Params) -> list[np.ndarray]:
    import mlx.core as mx

    def numpy(x: mx.array) -> np.ndarray:
        return np.array(x.view(mx.uint16)).view(BF16) if x.dtype == mx.bfloat16 else np.array(x)

    w = adapters.mlx_arrays({"w": weight})["w"]
    return [numpy(x) for x in mx.quantize(w, group_size=p.group_size, bits=p.bits, mode=p.mode)]
