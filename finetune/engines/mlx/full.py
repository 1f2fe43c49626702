"""Full fine-tuning on the MLX engine (mlx-lm's `full`): the last N blocks unfrozen, and a full
run's trained weights loaded over a base."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from returns.result import Failure, Result, Success

from finetune.core import adapters as core_adapters
from finetune.core import full
from finetune.engines.mlx.lora import layers_prefix, model_kind
from finetune.files.adapters import Adapter


def unfreeze(model: nn.Module, num_layers: int) -> nn.Module:
    """Freeze `model`, then unfreeze every parameter of its last `num_layers` blocks (-1: all)."""
    model.freeze()
    for i in full.trained_blocks(len(model.layers), num_layers):
        model.layers[i].unfreeze()
    return model


def load_trained(model: nn.Module, adapter: Adapter) -> Result[nn.Module, str]:
    """A full run's weights (every tensor a parameter of the model's blocks, checked) over `model`,
    in the model's dtype; the model stays frozen."""
    stored = core_adapters.to_file_keys(adapter.params, adapter.kind)  # the file's names
    params = core_adapters.from_file_keys(stored, model_kind(model))
    names = dict(zip(params, stored, strict=True))
    current = dict(tree_flatten(model.parameters()))
    if any(current[k].dtype == mx.uint32 for k in params if k in current):
        return Failure(f"{adapter.weights_path}: a full fine-tune's weights cannot load over a quantized base; load a float base")
    shapes = {k: tuple(v.shape) for k, v in current.items()}
    checked = full.check_weights(params, shapes, layers_prefix(model), str(adapter.weights_path), names)
    if isinstance(checked, Failure):
        return checked
    from finetune.files.weights import mlx_arrays

    arrays = mlx_arrays(params)
    model.load_weights([(k, v.astype(current[k].dtype)) for k, v in arrays.items()], strict=False)
    mx.eval(model.parameters())
    model.freeze()
    return Success(model)
