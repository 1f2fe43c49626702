"""Loading a MODEL (local dir, hub id, or `tiny`) into our MLX modules plus its tokenizer.

resolve -> config checks -> weights (converted-model cache, else safetensors/.bin -> `hf_to_mlx`
-> dtype cast) -> `build(config)` -> strict `load_weights` -> eval mode -> optional adapter.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from returns.result import Failure, Result, Success

from finetune.core import quantization
from finetune.core.quantization import Quant
from finetune.errors import UserError
from finetune.files import weights
from finetune.files.models import checkpoint_dtype, model_config, resolve_dtype

if TYPE_CHECKING:  # MLX is imported where it is used: these modules also serve the torch engine
    import mlx.nn as nn

DTYPES = ("auto", "float32", "float16", "bfloat16")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def on_gpu() -> bool:
    import mlx.core as mx

    return mx.default_device().type == mx.gpu


def load_model(
    spec: str,
    *,
    revision: str = "main",
    dtype: str = "auto",
    adapter: str | None = None,
    cache: bool = True,
    quantize: Quant | None = None,
) -> Result[tuple[nn.Module, Any], str]:
    """`(model, tokenizer)` for a MODEL spec, or a one-line reason; `model(ids)` gives logits.

    `cache`: serve converted weights from (and save them to) the converted-model cache.
    `quantize`: quantize a float checkpoint on load (QLoRA). An adapter that records a quantized
    base gets exactly that base back, or a refusal.
    """
    if dtype not in DTYPES:
        return Failure(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    match model_config(spec, revision):
        case Success((directory, config)):
            pass
        case failure:
            return failure
    match recorded(adapter):
        case Success(record):
            pass
        case failure:
            return failure
    float_base = quantization.from_config(config).value_or(None) is None
    if record is not None and quantize is None and float_base and record.get(quantization.ON_LOAD):
        quantize = quantization.parse_block(record, adapter or "").value_or(None)
    loaded = _load_dir(spec, revision, directory, config, dtype, cache, quantize)
    if adapter is None:
        return loaded

    def attach_adapter(pair: tuple[nn.Module, Any]) -> Result[tuple[nn.Module, Any], str]:
        from finetune.engines.mlx.lora import attach_adapter
        from finetune.engines.mlx.quantized import check_record

        want = quantization.parse_block(record, adapter).value_or(None) if record else None
        checked = check_record(pair[0], want, adapter, str(record.get(quantization.DIGEST, ""))) if record else Success(pair[0])
        return checked.bind(lambda m: attach_adapter(m, adapter)).map(lambda m: (m, pair[1]))

    return loaded.bind(attach_adapter)


def recorded(adapter: str | None) -> Result[dict[str, Any] | None, str]:
    """The quantized base an adapter was trained on, as its adapter_config.json records it."""
    if adapter is None:
        return Success(None)
    from finetune.files.adapters import base_quantization

    return base_quantization(adapter)


def _load_dir(
    spec: str,
    revision: str,
    directory: Path,
    config: Mapping[str, Any],
    dtype: str,
    cache: bool,
    quantize: Quant | None = None,
) -> Result[tuple[nn.Module, Any], str]:
    import mlx.core as mx

    from finetune.engines.mlx.model import build
    from finetune.files import manager
    from finetune.files.tokenizer import load_tokenizer

    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        return Failure(
            f"{spec}: no tokenizer files in {directory} (expected {' or '.join(TOKENIZER_FILES)})"
        )
    try:  # before the weights: a broken tokenizer should not cost a long conversion first
        tokenizer = load_tokenizer(directory)
    except Exception as err:  # transformers raises OSError/ValueError/... for missing files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return Failure(f"{spec}: cannot load the tokenizer from {directory} ({first})")
    try:
        model = build(quantization.without_quantization(config))
    except KeyError as err:
        return Failure(f"{spec}: config.json lacks field {err}")
    except (ValueError, TypeError) as err:  # what our modules do not implement
        return Failure(f"{spec}: {err}")
    target = resolve_dtype(dtype, checkpoint_dtype(directory, config), on_gpu())
    stored = quantization.from_config(config).value_or(None)  # check_config has parsed it
    if stored is not None:
        return _load_quantized(spec, model, directory, config, stored, target, quantize).map(
            lambda m: (m, tokenizer)
        )
    if cache:
        converted = manager.converted(spec, revision, directory, config, target)
    else:
        converted = manager.convert(directory, config, target)
    match converted:
        case Success(tensors):
            pass
        case Failure(message):  # the checkpoint against its config: name the checkpoint's file
            return Failure(message.replace(f"{directory}: ", f"{weights.source(directory)}: ", 1))
    if wrong := next((k for k, v in tensors.items() if not mx.issubdtype(v.dtype, mx.floating)), None):
        held = str(tensors[wrong].dtype).removeprefix("mlx.core.")
        return Failure(f"{weights.file_of(directory, wrong)}: tensor {wrong} is stored as {held}; "
                       "a float checkpoint's weights are floating point (float32, float16 or bfloat16)")
    try:
        model.load_weights(list(tensors.items()), strict=True)
        del tensors, converted  # quantizing on load: the lazy float weights are read once, layer by layer, then freed
        if quantize is not None:
            from finetune.engines.mlx.quantized import quantize_on_load

            match quantize_on_load(model, quantize, "--quantize-group-size"):
                case Failure(message):
                    return Failure(f"{spec}: {message}")
        mx.eval(model.parameters())
    except (ValueError, RuntimeError) as err:  # damage that only shows when tensors are read
        return Failure(f"{spec}: cannot load weights from {directory} ({err})")
    model.eval()
    return Success((model, tokenizer))


def _load_quantized(
    spec: str, model: nn.Module, directory: Path, config: Mapping[str, Any], stored: Quant,
    dtype: str, quantize: Quant | None,
) -> Result[nn.Module, str]:
    from finetune.engines.mlx.quantized import load_stored

    if quantize is not None:
        return Failure(f"{spec} is already quantized ({stored.summary()}); drop --quantize-bits "
                       "(quantizing on load is for float checkpoints)")
    return load_stored(model, directory, config, stored, dtype, spec).map(lambda m: (m.eval(), m)[1])


def load(
    model: str, adapter: str | None = None, dtype: str = "auto", revision: str = "main"
) -> tuple[nn.Module, Any]:
    """`finetune.load`: `(model, tokenizer)`; raises `UserError` with a one-line reason."""
    match load_model(model, revision=revision, dtype=dtype, adapter=adapter):
        case Success(pair):
            return pair
        case Failure(message):
            raise UserError(message)
    raise AssertionError("unreachable")
