"""`ft generate --backend torch`: a transformers model (with one of our adapters through peft),
KV-cached decoding in our own loop, the MLX engine's sampling rules.

Prompts, stop tokens and streamed text are the engine-free parts of `shell/models/generate.py`.
Greedy decoding gives the MLX engine's tokens (a test compares them on `tiny`); seeded sampling
repeats itself for a seed, but draws from torch's generator, so its text differs from MLX's.
"""

from __future__ import annotations

import inspect
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import torch
from returns.result import Failure, Result, Success
from torch import nn

from finetune.core import adapters as core_adapters
from finetune.core import dtypes, quantization
from finetune.core.config import Recipe
from finetune.engines.torch import lora as tmodel

PREFILL_CHUNK = 512  # prompt tokens per forward pass while filling the cache
USE_MLX = "the torch engine loads float checkpoints only; use --backend mlx"


def load(spec: str, adapter: str | None, device: torch.device, revision: str = "main") -> Result[tuple[nn.Module, Any], str]:
    """`(causal LM, tokenizer)` on `device` in eval mode, the adapter (if any) attached through peft."""
    from finetune.files.tokenizer import load_tokenizer
    from finetune.shell.models import sources

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
    lm = tmodel.load_base(directory, dtype_for(directory, config, device), spec)
    if adapter is not None:
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
    from finetune.engines.mlx.load import resolve_dtype
    from finetune.engines.torch.device import DTYPES
    from finetune.files.weights import checkpoint_dtype

    stored = checkpoint_dtype(directory) or config.get("torch_dtype") or config.get("dtype")
    return DTYPES[resolve_dtype("auto", stored, device.type != "cpu")]


def with_adapter(lm: nn.Module, directory: str) -> Result[nn.Module, str]:
    """peft LoRA holding the adapter's tensors (any format `ft` reads), on its layers when they are
    the last N (what `num_layers` says), else on every layer with the ones it lacks at B = 0."""
    from finetune.shell.export.adapters import load_any

    match load_any(directory):
        case Success(found):
            pass
        case Failure(message):
            return Failure(message)
    if found.spec is not None and found.spec.base_quantization:
        return Failure(f"{found.config_path}: trained on a quantized base (base_quantization); {USE_MLX}")
    blocks = tmodel.block_list(lm)
    if blocks is None:
        return Failure(f"{directory}: no list of transformer blocks found in this model to attach LoRA to")
    prefix, layers_list = blocks
    params = {k: np.array(dtypes.as_float32(v)) for k, v in found.params.items()}  # float32 (bf16 words too), writable
    layers, keys = core_adapters.layers_and_keys(core_adapters.paths_of(params))
    linears = tmodel.linear_shapes(layers_list[0])
    unknown = [k for k in keys if k not in linears]
    if not layers or unknown:
        what = ", ".join(unknown) or "no LoRA layers"
        return Failure(f"{found.weights_path}: {what} not in this model's blocks (has: {', '.join(linears)})")
    shapes = core_adapters.block_shapes(linears, prefix, len(layers_list))
    checked = core_adapters.check_shapes(params, shapes, found.rank, str(found.weights_path), found.names)
    if isinstance(checked, Failure):
        return checked
    total = len(layers_list)
    tail = layers == tuple(range(total - len(layers), total))
    r = Recipe()
    recipe = msgspec.structs.replace(r, lora=msgspec.structs.replace(
        r.lora, rank=found.rank, scale=found.scale, dropout=0.0, keys=keys, num_layers=len(layers) if tail else -1,
        fine_tune_type="dora" if any(k.endswith(".m") for k in params) else "lora"))
    return tmodel.attach(lm, recipe, directory).map(lambda m: _loaded(m, params))


def _loaded(model: tmodel.Lora, params: dict[str, np.ndarray]) -> nn.Module:
    model.load_adapters(params)
    return model.lm


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_ids: Sequence[int],
    *,
    max_tokens: int,
    temp: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_ids: Collection[int] = (),
) -> Iterator[int]:
    """Token ids after `prompt_ids`, one at a time, until a stop id (not yielded) or `max_tokens`.

    The prompt fills transformers' DynamicCache once (logits only for its last token); each later
    step feeds one token. Sampling draws from a CPU generator seeded with `seed`.
    """
    from transformers import DynamicCache

    if not prompt_ids:
        raise ValueError("generation needs at least one prompt token")
    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    draws = torch.Generator().manual_seed(seed)
    stops = frozenset(stop_ids)

    # transformers 5.2x renamed `past_key_values` to `cache` (the old name warns, then goes).
    named = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def last_logits(ids: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=ids[None], use_cache=True, logits_to_keep=1, **{named: cache})
        return out.logits[0, -1]  # (V,)

    prompt = torch.tensor(list(prompt_ids), dtype=torch.long, device=device)
    for start in range(0, len(prompt) - 1, PREFILL_CHUNK):  # all but the last prompt token
        last_logits(prompt[start : min(start + PREFILL_CHUNK, len(prompt) - 1)])
    logits = last_logits(prompt[-1:])
    for n in range(max_tokens):
        token = sample(logits, temp=temp, top_p=top_p, generator=draws)
        if token in stops:
            return
        yield token
        if n + 1 < max_tokens:
            logits = last_logits(torch.tensor([token], dtype=torch.long, device=device))


def sample(logits: torch.Tensor, *, temp: float, top_p: float, generator: torch.Generator) -> int:
    """One token id from logits (V,): argmax at temp 0, else temperature then top-p, as the MLX
    engine's `sampling.sample` (the same nucleus: tokens tied with the last kept one stay)."""
    assert temp >= 0.0 and 0.0 <= top_p <= 1.0, (temp, top_p)
    if temp == 0.0:
        return int(torch.argmax(logits))
    scaled = logits.float().cpu() / temp
    if top_p < 1.0:
        scaled = nucleus(scaled, top_p)
    return int(torch.multinomial(torch.softmax(scaled, dim=-1), 1, generator=generator))


def nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """`logits` (V,) with every token outside the top-p nucleus set to -inf."""
    ranked, _ = torch.sort(logits, descending=True)
    probs = torch.softmax(ranked, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass strictly ahead of each ranked token
    kept = max(int((before < top_p).sum()), 1)  # the top token always stays
    cutoff = ranked[kept - 1]  # the smallest kept logit
    return torch.where(logits >= cutoff, logits, torch.tensor(float("-inf")))
