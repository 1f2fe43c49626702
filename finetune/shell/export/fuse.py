"""`ft fuse`: merge an adapter into its base model and write a complete HF model directory.

load base + adapter (float32 compute; a quantized base stays quantized) -> adapter and base logits ->
fuse every LoRA pair in float32 (quantized layers dequantized) -> round to the output dtype, and
re-quantize a quantized base's fused layers unless --dequantize -> check logits -> write config,
safetensors shards (+ index), tokenizer and generation files into a temporary directory -> rename.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from msgspec import Struct
from returns.result import Failure, Result, Success

from finetune.core import fusing, quantization
from finetune.core.quantization import Params, without_quantization
from finetune.models.lora import LoRALinear
from finetune.shell.models import quantized, sources, weights
from finetune.shell.models.weights import cast_weights

Log = Callable[[str], None]
PROMPT = ("The quick brown fox jumps over the lazy dog. SELECT name, age FROM users WHERE id = 42;\n"
          "Q: What is the capital of France?\nA: Paris.")
MAX_TOKENS = 64  # per check row


class Fused(Struct, frozen=True, kw_only=True):
    output: str
    dtype: str
    layers: int  # LoRA pairs merged
    files: list[str]
    size: int  # bytes of weights written
    check: fusing.Check
    dequantized: bool = False
    quantization: str = ""  # how the written weights are quantized ("" = float)


def fuse(
    model_spec: str,
    adapter: Path,
    output: Path,
    *,
    dtype: str | None = None,
    dequantize: bool = False,
    data: str | None = None,
    rows: int = 4,
    max_shard_bytes: int = 2_000_000_000,
    force: bool = False,
    revision: str = "main",
    log: Log = lambda _: None,
) -> Result[Fused, str]:
    """Fuse `adapter` into `model_spec` and write `output`, or a one-line reason (nothing written).

    A quantized base (as stored, or as the adapter records it was quantized on load) gives a
    fused model quantized the same way, unless `dequantize`.
    """
    from finetune.shell.models.load import load_model

    match _target(model_spec, revision, adapter, output, force):
        case Success((directory, config)):
            pass
        case failure:
            return failure
    target = dtype or _default_dtype(directory, config)
    log(f"Loading {model_spec} with {adapter} ...")
    match load_model(model_spec, revision=revision, dtype="float32", adapter=str(adapter)):
        case Success((model, tokenizer)):
            pass
        case failure:
            return failure
    match _check_rows(tokenizer, data, rows, int(config.get("vocab_size", 1 << 30))):
        case Success(ids):
            pass
        case failure:
            return failure
    adapter_logits, base_logits = _logits(model, ids), _base_logits(model, ids)
    plan = {p: q for p, q in quantized.layers(model).items() if q is not None}
    quant = None if dequantize else quantized.describe(model)
    log(f"Fusing into {target}{' (re-quantized: ' + quant.summary() + ')' if quant else ''} ...")
    dense, pairs, scale = _dense_weights(model, plan)
    stored = cast_weights(fusing.fuse_all(dense, pairs, scale), getattr(mx, target))
    base_stored = cast_weights(dense, getattr(mx, target))
    if quant is not None:
        packed = _own_names(model)
        stored = fusing.requantize(stored, packed, plan, set(pairs))
        base_stored = fusing.requantize(base_stored, packed, plan, set(pairs))  # the format's own noise
    keep = plan if quant is not None else {}
    plain = without_quantization(config)
    check = fusing.measure(
        base_logits, adapter_logits, _logits(_reloaded(plain, base_stored, keep), ids),
        _logits(_reloaded(plain, stored, keep), ids), target, quant.summary() if quant else "",
    )
    match fusing.verdict(check):
        case Failure(message):
            return Failure(f"refusing to write {output}: {message}")
    kind = config["model_type"]
    if quant is not None:  # mlx-lm's layout, as its own fuse writes a quantized model
        tensors, metadata = quantization.ours_to_mlx(kind, cast_weights(stored, getattr(mx, target))), "mlx"
    else:
        tensors, metadata = fusing.hf_tensors(kind, config, stored), "pt"
    names = _write(output, directory, tensors, fusing.fused_config(config, target, quant), metadata,
                   max_shard_bytes, force, log)
    return Success(Fused(
        output=str(output), dtype=target, layers=len(pairs), files=names,
        size=sum(v.nbytes for v in tensors.values()), check=check,
        dequantized=bool(plan) and quant is None, quantization=quant.summary() if quant else "",
    ))


def _target(spec: str, revision: str, adapter: Path, output: Path, force: bool) -> Result[tuple[Path, dict], str]:
    """The base's directory and config, after checking OUTPUT can be written."""
    from finetune.shell.models.load import check_config

    if output.exists() and not output.is_dir():
        return Failure(f"{output}: exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not force:
        return Failure(f"{output}: already exists and is not empty; pass --force to replace it")
    match sources.model_dir(spec, revision).bind(
        lambda d: sources.read_config(d).bind(lambda c: check_config(c, spec)).map(lambda c: (d, c))
    ):
        case Success((directory, config)):
            pass
        case failure:
            return failure
    for other in (directory, adapter):
        if other.exists() and output.resolve() == other.resolve():
            return Failure(f"{output}: is the {'model' if other == directory else 'adapter'} directory itself; choose another --output")
    return Success((directory, dict(config)))


def _write(output: Path, directory: Path, tensors: dict[str, mx.array], config: dict, metadata: str,
           max_shard_bytes: int, force: bool, log: Log) -> list[str]:
    """Config, weight shards (+ index) and the base's tokenizer files, as one rename."""
    from finetune.shell.paths import write_dir

    sizes = {k: v.nbytes for k, v in tensors.items()}
    plan = fusing.shard_plan(sizes, max_shard_bytes)
    names = fusing.shard_names(len(plan))
    log(f"Writing {output} ({len(names)} weight file{'s' if len(names) > 1 else ''}) ...")

    def build(tmp: Path) -> None:
        for shard, name in zip(plan, names, strict=True):
            mx.save_safetensors(str(tmp / name), {k: tensors[k] for k in shard}, metadata={"format": metadata})
        if len(plan) > 1:
            _write_json(tmp / fusing.INDEX, fusing.index_json(plan, sizes))
        _write_json(tmp / "config.json", config)
        for f in side_files(directory):
            shutil.copyfile(f, tmp / f.name)  # follows the HF cache's symlinks

    write_dir(output, build, force)
    return names


def side_files(directory: Path) -> list[Path]:
    """Tokenizer, chat template and generation files to copy beside the fused weights."""
    patterns = [p for p in sources.SIDE_FILES if p != "config.json"]
    return sorted({f for p in patterns for f in directory.glob(p) if f.is_file()})


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def _default_dtype(directory: Path, config: dict) -> str:
    """The checkpoint's own float dtype (so the fused model is the base's size), else float32."""
    found = weights.checkpoint_dtype(directory) or config.get("dtype") or config.get("torch_dtype")
    return found if found in fusing.DTYPES else "float32"


def _check_rows(tokenizer: Any, data: str | None, rows: int, vocab: int) -> Result[list[list[int]], str]:
    """Token ids of the check rows: the first `rows` of `data`'s train split, else a fixed prompt."""
    texts = [PROMPT]
    if data is not None:
        from finetune.core.prepare import normalise_rows
        from finetune.shell.data import datasets

        match datasets.locate(data):
            case Success(files):
                pass
            case failure:
                return failure
        found, _ = datasets.read_rows(files["train"])
        samples, _ = normalise_rows(found[: rows * 4])
        texts = [t for t in (fusing.sample_text(s) for _, s in samples) if t][:rows]
        if not texts:
            return Failure(f"{files['train']}: no usable rows for the fused-model check")
    ids = [[i for i in tokenizer(t)["input_ids"] if i < vocab][:MAX_TOKENS] for t in texts]
    ids = [row for row in ids if row]
    return Success(ids) if ids else Failure("the check prompt tokenizes to nothing")


def _logits(model: nn.Module, rows: list[list[int]]) -> list[mx.array]:
    out = [model(mx.array([row]))[0].astype(mx.float32) for row in rows]  # (T, vocab) each
    mx.eval(out)
    return out


def _base_logits(model: nn.Module, rows: list[list[int]]) -> list[mx.array]:
    """The base model's logits: every LoRA layer's scale set to 0 for the call (exactly the base)."""
    wrapped = [m for _, m in model.named_modules() if isinstance(m, LoRALinear)]
    scales = [m.scale for m in wrapped]
    for m in wrapped:
        m.scale = 0.0
    try:
        return _logits(model, rows)
    finally:
        for m, s in zip(wrapped, scales, strict=True):
            m.scale = s


def _own_names(model: nn.Module) -> dict[str, mx.array]:
    """The model's base tensors under their own names (a LoRA layer's base under its path)."""
    wrapped = {path for path, m in model.named_modules() if isinstance(m, LoRALinear)}
    flat: dict[str, mx.array] = {}
    for name, value in tree_flatten(model.parameters()):
        path, _, leaf = name.rpartition(".")
        if leaf in ("lora_a", "lora_b") and path in wrapped:
            continue
        owner = path.removesuffix(".linear")
        flat[f"{owner}.{leaf}" if owner in wrapped else name] = value
    return flat


def _dense_weights(model: nn.Module, plan: dict[str, Params]) -> tuple[dict[str, mx.array], dict[str, tuple[mx.array, mx.array]], float]:
    """The base weights under their own names (dequantized, float32), the LoRA pairs and scale."""
    wrapped = {path: m for path, m in model.named_modules() if isinstance(m, LoRALinear)}
    pairs = {path: (m.lora_a, m.lora_b) for path, m in wrapped.items()}
    scales = {m.scale for m in wrapped.values()}
    assert len(scales) <= 1, "one adapter has one scale"
    flat = fusing.dequantize(_own_names(model), plan)
    return cast_weights(flat, mx.float32), pairs, scales.pop() if scales else 0.0


def _reloaded(config: dict, tensors: dict[str, mx.array], plan: dict[str, Params]) -> nn.Module:
    """A fresh model holding `tensors` (floats upcast, `plan`'s modules quantized): what the
    written checkpoint computes."""
    from finetune.models import build

    model = build(config)
    quantized.apply(model, plan)
    model.load_weights(list(cast_weights(tensors, mx.float32).items()), strict=True)
    model.eval()
    return model
