"""The torch engine's loading: a transformers causal LM from a local directory, its weights read
and checked by the one reader (`weights.py`), and its tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from returns.result import Failure, Result, Success
from torch import nn

from finetune.core import quantization

USE_MLX = "the torch engine loads float checkpoints only; use --backend mlx"


def load_base(directory: Path, dtype: torch.dtype, spec: str) -> Result[nn.Module, str]:
    """The causal LM of a local directory (no remote code) in `dtype`, eval mode, its weights read
    and checked by the shared reader against the model transformers builds from config.json."""
    from transformers.utils import logging

    from finetune.engines.torch.weights import load_checked

    logging.disable_progress_bar()  # one bar per shard read is noise beside our own progress
    return load_checked(directory, dtype, spec)


def load(spec: str, adapter: str | None, device: torch.device, revision: str = "main") -> Result[tuple[nn.Module, Any], str]:
    """`(causal LM, tokenizer)` on `device` in eval mode, the adapter (if any) attached through peft."""
    from finetune.files import sources
    from finetune.files.tokenizer import load_tokenizer

    match sources.model_dir(spec, revision).bind(lambda d: sources.read_config(d).map(lambda c: (d, c))):
        case Success((directory, config)):
            pass
        case Failure(message):
            return Failure(message)
    if "auto_map" in config:
        return Failure(f"{spec}: config.json has auto_map (custom model code); FineTune never runs remote code")
    match quantization.from_config(config, f"{spec}: config.json"):
        case Success(None):
            pass
        case Success(_):
            return Failure(f"{spec}: an mlx-lm quantized checkpoint; {USE_MLX}")
        case Failure(message):
            return Failure(message)
    lm = load_base(directory, dtype_for(directory, config, device), spec)
    if adapter is not None:
        from finetune.engines.torch.lora import with_adapter

        lm = lm.bind(lambda base: with_adapter(base, adapter))
    if isinstance(lm, Failure):  # before the tokenizer, whose own reading of config.json would warn too
        return lm
    try:
        tokenizer = load_tokenizer(directory)
    except Exception as err:  # transformers raises OSError/ValueError/... for broken files
        return Failure(f"{directory}: cannot load the tokenizer ({type(err).__name__}: {err})")
    return lm.map(lambda m: (m.to(device).eval(), tokenizer))


def dtype_for(directory: Path, config: dict, device: torch.device) -> torch.dtype:
    """The MLX engine's rule for generation: float32 on the CPU, a half-precision checkpoint's own
    dtype on a GPU (so greedy output matches across engines where both compute in float32)."""
    from finetune.engines.torch.device import DTYPES
    from finetune.files.models import resolve_dtype
    from finetune.files.weights import checkpoint_dtype

    stored = checkpoint_dtype(directory) or config.get("torch_dtype") or config.get("dtype")
    return DTYPES[resolve_dtype("auto", stored, device.type != "cpu")]
