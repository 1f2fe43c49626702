"""Measure the peak memory of a few real LoRA train steps (for the estimator test and benchmark).

A model is built in-process from a HF config with random weights, optionally quantized on load
as `ft train start` does, adapted with LoRA as the recipe says, and trained by the real loop
(`shell/trainer.train`) on synthetic rows of a fixed padded length.
"""

from __future__ import annotations

import gc

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import msgspec
from mlx.utils import tree_flatten

from finetune.core import batching, lora
from finetune.core.config import Recipe
from finetune.core.tokenize import Tokens
from finetune.engines.mlx import lora as lora_modules
from finetune.engines.mlx import step as trainer
from finetune.engines.mlx.model import build
from finetune.engines.protocol import Data
from finetune.shell.training import loop
from finetune.shell.training.rundir import Cursor


def rows(count: int, length: int, supervised: float, vocab: int) -> list[Tokens]:
    """`count` rows of `length + 1` tokens whose last `supervised` share carries loss."""
    n = length + 1
    start = n - max(1, int(length * supervised))
    return [
        Tokens(tuple((7 * i + 13 * t) % vocab for t in range(n)), tuple(int(t >= start) for t in range(n)))
        for i in range(count)
    ]


def model_with_lora(config: dict, recipe: Recipe) -> nn.Module:
    model = build(config)
    params = [
        (k, mx.random.normal(v.shape, key=mx.random.key(i)) * 0.1 if v.ndim > 1 else mx.ones(v.shape))
        for i, (k, v) in enumerate(tree_flatten(model.parameters()))
    ]
    model.load_weights(params)
    bits = recipe.model.quantize_bits
    if bits:
        nn.quantize(model, group_size=64, bits=bits,
                    class_predicate=lambda _, m: isinstance(m, nn.Linear) and m.weight.shape[-1] % 64 == 0)
    block = lora_modules.block_linears(model)
    keys = lora.resolve_keys(recipe.lora.keys, block)
    layers = lora.select_layers(len(model.layers), recipe.lora.num_layers)
    shapes = lora_modules.linear_shapes(model, lora.targets(lora_modules.layers_prefix(model), layers, keys))
    params = {k: mx.array(v) for k, v in lora.init(0, shapes, recipe.lora.rank).items()}
    lora_modules.attach(model, params, recipe.lora.scale)
    mx.eval(model.parameters())
    return model


def measure(config: dict, recipe: Recipe, seq: int, supervised: float = 0.5, steps: int = 2) -> int:
    """Peak bytes (weights included) over `steps` optimizer steps of batches padded to `seq`."""
    return train_steps(config, recipe, seq, supervised, steps)[0]


def train_steps(config: dict, recipe: Recipe, seq: int, supervised: float = 0.5, steps: int = 2) -> tuple[int, list[float]]:
    """(peak bytes, the train loss of every step) of `steps` optimizer steps from fixed weights."""
    gc.collect()
    mx.clear_cache()
    t = recipe.train
    model = model_with_lora(config, recipe)
    mx.reset_peak_memory()  # the peak from here on still counts the weights, which stay allocated
    examples = rows(t.batch_size * t.grad_accumulation * steps, seq, supervised, config["vocab_size"])
    data = Data(examples, batching.length_sorted([len(e.ids) for e in examples], t.batch_size))
    optimizer = optim.AdamW(learning_rate=t.learning_rate)
    optimizer.init(model.trainable_parameters())
    losses: list[float] = []
    with trainer.checkpointed(model, t.grad_checkpoint):
        loop.run_steps(trainer.Trainer(model, optimizer, t), data, None, msgspec.structs.replace(t, report_every=1), steps, Cursor(),
                      on_report=lambda r: losses.append(r.train_loss), on_save=lambda c: None, on_log=lambda line: None)
    peak = mx.get_peak_memory()
    del model, optimizer
    gc.collect()
    mx.clear_cache()
    return peak, losses
