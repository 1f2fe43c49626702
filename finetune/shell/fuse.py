"""`ft fuse`: merge an adapter into its base model and write a complete HF model directory.

load base (float32; MLX-quantized bases dequantized) -> logits -> attach the adapter -> logits ->
fuse every LoRA pair in float32 -> round to the output dtype -> check logits -> write config,
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

from finetune.core import fusing
from finetune.core.convert import cast_weights
from finetune.models.lora import LoRALinear
from finetune.shell import resolve, weights

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
    """Fuse `adapter` into `model_spec` and write `output`, or a one-line reason (nothing written)."""
    from finetune.shell.adapters import attach
    from finetune.shell.load import check_config

    if output.exists() and not output.is_dir():
        return Failure(f"{output}: exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not force:
        return Failure(f"{output}: already exists and is not empty; pass --force to replace it")
    match resolve.model_dir(model_spec, revision).bind(
        lambda d: resolve.read_config(d).bind(lambda c: check_config(c, model_spec)).map(lambda c: (d, c))
    ):
        case Success((directory, config)):
            pass
        case failure:
            return failure
    for other in (directory, adapter):
        if other.exists() and output.resolve() == other.resolve():
            return Failure(f"{output}: is the {'model' if other == directory else 'adapter'} directory itself; choose another --output")
    match fusing.quantization(config).alt(lambda m: f"{directory}/{m}"):
        case Success(quant):
            pass
        case failure:
            return failure
    if quant is not None and not dequantize:
        return Failure(f"{model_spec} is quantized ({quant.bits}-bit, group size {quant.group_size}): merging LoRA "
                       "into quantized weights would lose the adapter; pass --dequantize to write a "
                       "full-precision fused model")
    target = dtype or _default_dtype(directory, config)

    log(f"Loading {model_spec} ...")
    match _load_base(model_spec, revision, directory, config, quant):
        case Success((model, tokenizer)):
            pass
        case failure:
            return failure
    match _check_rows(tokenizer, data, rows, int(config.get("vocab_size", 1 << 30))):
        case Success(ids):
            pass
        case failure:
            return failure
    base_logits = _logits(model, ids)
    log(f"Attaching {adapter} ...")
    match attach(model, adapter):
        case Success(_):
            pass
        case failure:
            return failure
    adapter_logits = _logits(model, ids)

    log(f"Fusing into {target} ...")
    dense, pairs, scale = _dense_weights(model, quant)
    fused32 = fusing.fuse_all(dense, pairs, scale)
    stored, base_stored = cast_weights(fused32, getattr(mx, target)), cast_weights(dense, getattr(mx, target))
    plain = fusing.dense_config(config)
    check = fusing.measure(
        base_logits, adapter_logits, _logits(_reloaded(plain, base_stored), ids),
        _logits(_reloaded(plain, stored), ids), target,
    )
    match fusing.verdict(check):
        case Failure(message):
            return Failure(f"refusing to write {output}: {message}")

    tensors = fusing.hf_tensors(config["model_type"], config, stored)
    sizes = {k: v.nbytes for k, v in tensors.items()}
    plan = fusing.shard_plan(sizes, max_shard_bytes)
    names = fusing.shard_names(len(plan))
    log(f"Writing {output} ({len(names)} weight file{'s' if len(names) > 1 else ''}) ...")

    def build(tmp: Path) -> None:
        for shard, name in zip(plan, names, strict=True):
            mx.save_safetensors(str(tmp / name), {k: tensors[k] for k in shard}, metadata={"format": "pt"})
        if len(plan) > 1:
            _write_json(tmp / fusing.INDEX, fusing.index_json(plan, sizes))
        _write_json(tmp / "config.json", fusing.fused_config(config, target))
        for f in side_files(directory):
            shutil.copyfile(f, tmp / f.name)  # follows the HF cache's symlinks

    from finetune.shell.paths import write_dir

    write_dir(output, build, force)
    return Success(Fused(
        output=str(output), dtype=target, layers=len(pairs), files=names, size=sum(sizes.values()),
        check=check, dequantized=quant is not None,
    ))


def side_files(directory: Path) -> list[Path]:
    """Tokenizer, chat template and generation files to copy beside the fused weights."""
    patterns = [p for p in resolve.SIDE_FILES if p != "config.json"]
    return sorted({f for p in patterns for f in directory.glob(p) if f.is_file()})


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def _default_dtype(directory: Path, config: dict) -> str:
    """The checkpoint's own float dtype (so the fused model is the base's size), else float32."""
    found = weights.checkpoint_dtype(directory) or config.get("dtype") or config.get("torch_dtype")
    return found if found in fusing.DTYPES else "float32"


def _load_base(spec: str, revision: str, directory: Path, config: dict, quant: fusing.Quant | None) -> Result[tuple[nn.Module, Any], str]:
    """The base model in float32, or with its MLX-quantized layers as stored."""
    from finetune.shell.load import load_model

    if quant is None:
        return load_model(spec, revision=revision, dtype="float32")
    from finetune.models import build
    from finetune.shell.tokenizer import load_tokenizer

    if config.get("model_type") == "gpt2":
        return Failure(f"{spec}: quantized GPT-2 checkpoints are not supported")
    match weights.read_checkpoint(directory):
        case Success(tensors):
            pass
        case failure:
            return failure
    model = build(fusing.dense_config(config))
    quantized = set(fusing.quantized_paths(tensors))
    nn.quantize(model, class_predicate=lambda p, _: quant.params(p) if p in quantized else False)
    try:
        model.load_weights(list(tensors.items()), strict=True)
        mx.eval(model.parameters())
    except (ValueError, RuntimeError) as err:
        return Failure(f"{spec}: cannot load the quantized weights from {directory} ({err})")
    model.eval()
    try:
        return Success((model, load_tokenizer(directory)))
    except Exception as err:  # transformers raises several types for missing files
        return Failure(f"{spec}: cannot load the tokenizer from {directory} ({err})")


def _check_rows(tokenizer: Any, data: str | None, rows: int, vocab: int) -> Result[list[list[int]], str]:
    """Token ids of the check rows: the first `rows` of `data`'s train split, else a fixed prompt."""
    texts = [PROMPT]
    if data is not None:
        from finetune.core.prepare import normalise_rows
        from finetune.shell import datasets

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


def _dense_weights(model: nn.Module, quant: fusing.Quant | None) -> tuple[dict[str, mx.array], dict[str, tuple[mx.array, mx.array]], float]:
    """The base weights under their own names (dequantized, float32), the LoRA pairs and scale."""
    wrapped = {path: m for path, m in model.named_modules() if isinstance(m, LoRALinear)}
    pairs = {path: (m.lora_a, m.lora_b) for path, m in wrapped.items()}
    scales = {m.scale for m in wrapped.values()}
    assert len(scales) <= 1, "one adapter has one scale"
    flat: dict[str, mx.array] = {}
    for name, value in tree_flatten(model.parameters()):
        path, _, leaf = name.rpartition(".")
        if leaf in ("lora_a", "lora_b") and path in wrapped:
            continue
        owner = path.removesuffix(".linear")
        flat[f"{owner}.{leaf}" if owner in wrapped else name] = value
    if quant is not None:
        flat = fusing.dequantize(flat, quant)
    return cast_weights(flat, mx.float32), pairs, scales.pop() if scales else 0.0


def _reloaded(config: dict, tensors: dict[str, mx.array]) -> nn.Module:
    """A fresh float32 model holding `tensors` (upcast): what the written checkpoint computes."""
    from finetune.models import build

    model = build(config)
    model.load_weights(list(cast_weights(tensors, mx.float32).items()), strict=True)
    model.eval()
    return model
