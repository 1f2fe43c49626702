"""Full fine-tuning (mlx-lm's `fine_tune_type = "full"`): which weights train, which recipes make
sense, and whether a run's trained weights fit a model (pure).

As mlx-lm: the model is frozen and every parameter of the last `num_layers` blocks (-1: all)
trains; the embeddings, the final norm and an untied head stay as they are. The run's
`adapters.safetensors` holds those weights under mlx-lm's names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from returns.result import Failure, Result, Success

from finetune.core import lora
from finetune.core.adapters import split_path
from finetune.core.config import ALL_LINEAR, Recipe


def check_recipe(recipe: Recipe) -> Result[None, str]:
    """Refuse what a full fine-tune cannot do: a quantized base, LoRA's keys and dropout."""
    if recipe.lora.fine_tune_type != "full":
        return Success(None)
    if recipe.model.quantize_bits:
        return Failure(f"$.model.quantize_bits: {recipe.model.quantize_bits}-bit weights cannot be trained; a full "
                       "fine-tune trains float weights (drop --quantize-bits, or use --fine-tune-type lora for QLoRA)")
    if recipe.lora.keys != (ALL_LINEAR,):
        return Failure(f"$.lora.keys: {','.join(recipe.lora.keys)} picks LoRA's linears; a full fine-tune trains every "
                       "weight of its blocks (choose how many with --lora-layers)")
    if recipe.lora.dropout:
        return Failure(f"$.lora.dropout: {recipe.lora.dropout} drops LoRA's inputs; a full fine-tune has no adapters "
                       "(set it to 0)")
    return Success(None)


def trained_blocks(total: int, num_layers: int) -> range:
    """The block indices a full fine-tune trains: the last `num_layers` (-1: all)."""
    return lora.select_layers(total, num_layers)


def in_blocks(name: str, prefix: str, blocks: Sequence[int]) -> bool:
    """`name` (a parameter path) belongs to one of `blocks` under `prefix` (`model.layers`)."""
    parts = split_path(name.rpartition(".")[0])
    return parts is not None and parts[0] == prefix and parts[1] in blocks


def check_weights(params: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], prefix: str,
                  source: str, names: Mapping[str, str] | None = None) -> Result[None, str]:
    """Every tensor of a full run names a parameter of the model's blocks with its shape.

    `expected`: every parameter of the model (our names) and its shape; `names`: how the file
    calls each tensor (messages name the file's tensor).
    """
    def shown(name: str) -> str:
        return names.get(name, name) if names else name

    if not params:
        return Failure(f"{source}: holds no tensors")
    for name in sorted(params):
        if name not in expected or not in_blocks(name, prefix, range(1 << 30)):
            return Failure(f"{source}: {shown(name)} is not a weight of this model's blocks")
        got, want = tuple(params[name].shape), tuple(expected[name])
        if got != want:
            return Failure(f"{source}: {shown(name)} has shape {got}, the model needs {want}")
    return Success(None)
