"""Full fine-tuning on the torch engine (mlx-lm's `full`): every parameter of the last N blocks of a
transformers causal LM trains (no peft); a full run's trained weights load over a base. A bfloat16
base keeps its frozen parts in bfloat16 and trains its blocks in float32 (as LoRA factors are),
computing under autocast.

Our tensor names are the MLX engine's (HF module paths); only GPT-2's Conv1D weights are stored
transposed here, so those alone are flipped on the way in and out.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from returns.result import Failure, Result, Success
from torch import nn

from finetune.core import adapters as core_adapters
from finetune.core import full
from finetune.core.config import Recipe
from finetune.engines.torch.lora import Lora, block_list, checkpoint_dropout_off, is_conv1d
from finetune.files.adapters import Adapter


def _conv1d_weights(lm: nn.Module) -> set[str]:
    """Parameter names of GPT-2 Conv1D weights ((in, out) here, (out, in) in our layout)."""
    return {f"{path}.weight" for path, m in lm.named_modules() if is_conv1d(m)}


def _ours(t: torch.Tensor, flip: bool) -> torch.Tensor:
    return t.T if flip else t


class Full(Lora):
    """A transformers causal LM whose last blocks train in full: what the trainer needs of it
    (`hidden`, `head`, the trained tensors by our names), as `Lora` offers it for LoRA."""

    def __init__(self, lm: nn.Module, prefix: str, names: tuple[str, ...], compile: bool = False):
        nn.Module.__init__(self)
        self.peft = None
        self.lm = lm
        self.backbone = getattr(lm, lm.base_model_prefix)
        self.prefix = prefix
        self.paths = ()  # no adapted modules
        self.names = names  # the trained parameters, sorted
        self.flipped = _conv1d_weights(lm) & set(names)
        self.use_compile = compile
        self.compiled = None

    def trainable(self) -> dict[str, torch.Tensor]:
        params = dict(self.lm.named_parameters())
        return {n: params[n] for n in self.names}

    def adapters(self) -> dict[str, torch.Tensor]:
        """The trained weights in our layout, detached, on the CPU (bfloat16 as float32: NumPy has none)."""
        out = {}
        for k, v in self.trainable().items():
            t = _ours(v.detach(), k in self.flipped).cpu().contiguous()
            out[k] = t.float() if t.dtype == torch.bfloat16 else t
        return out

    def load_adapters(self, params: Mapping[str, np.ndarray]) -> None:
        live = self.trainable()
        with torch.no_grad():
            for name, value in params.items():
                t = torch.from_numpy(np.ascontiguousarray(np.asarray(value)))
                live[name].copy_(_ours(t, name in self.flipped))

    def our_shape(self, name: str, tensor: torch.Tensor) -> tuple[int, ...]:
        return tuple(_ours(tensor, name in self.flipped).shape)

    def transposed(self) -> set[str]:
        return self.flipped


def attach(lm: nn.Module, recipe: Recipe, spec: str) -> Result[Full, str]:
    """`lm` frozen but for every parameter of its last `num_layers` blocks."""
    found = block_list(lm)
    if found is None:
        return Failure(f"{spec}: no list of transformer blocks found in this model; a full fine-tune trains blocks")
    prefix, blocks = found
    if recipe.lora.num_layers > len(blocks):
        return Failure(f"$.lora.num_layers: {recipe.lora.num_layers} exceeds the model's {len(blocks)} layers")
    lm.requires_grad_(False)
    checkpoint_dropout_off(lm)
    names = []
    for i in full.trained_blocks(len(blocks), recipe.lora.num_layers):
        blocks[i].float()  # a half-precision base trains float32 blocks (Adam's small steps survive), under autocast
        for n, p in blocks[i].named_parameters():
            p.requires_grad_(True)
            names.append(f"{prefix}.{i}.{n}")
    return Success(Full(lm, prefix, tuple(sorted(names)), compile=recipe.train.compile))


def load_trained(lm: nn.Module, adapter: Adapter) -> Result[nn.Module, str]:
    """A full run's weights (every tensor a parameter of the model's blocks, checked) copied into `lm`."""
    found = block_list(lm)
    if found is None:
        return Failure(f"{adapter.directory}: no list of transformer blocks found in this model")
    prefix = found[0]
    stored = core_adapters.to_file_keys(adapter.params, adapter.kind)
    family = core_adapters.kind_of([prefix + ".0.x"])
    params = core_adapters.from_file_keys(stored, family)
    flipped = _conv1d_weights(lm)
    live = dict(lm.named_parameters())
    shapes = {k: tuple(_ours(v, k in flipped).shape) for k, v in live.items()}
    checked = full.check_weights(params, shapes, prefix, str(adapter.weights_path), dict(zip(params, stored, strict=True)))
    if isinstance(checked, Failure):
        return checked
    from finetune.core import dtypes

    with torch.no_grad():
        for name, value in params.items():
            t = torch.from_numpy(np.array(dtypes.as_float32(value)))
            live[name].copy_(_ours(t, name in flipped))
    return Success(lm)
