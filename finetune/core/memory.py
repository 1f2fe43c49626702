"""A rough training-memory estimate (GB) from model facts and the recipe: for planning only."""

from __future__ import annotations

from msgspec import Struct

from finetune.core.config import ALL_LINEAR, Recipe
from finetune.core.modelinfo import ModelFacts

BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


class MemoryEstimate(Struct, frozen=True, kw_only=True):
    weights_gb: float
    lora_gb: float  # adapters + their gradients + Adam moments
    activations_gb: float
    trainable: int

    @property
    def total_gb(self) -> float:
        return self.weights_gb + self.lora_gb + self.activations_gb


def target_keys(facts: ModelFacts, keys: tuple[str, ...]) -> tuple[str, ...]:
    """Resolve `all-linear` into the block's linear key paths; keep explicit keys as given."""
    shapes = facts.linear_shapes()
    return tuple(shapes) if ALL_LINEAR in keys else keys


def lora_parameters(facts: ModelFacts, recipe: Recipe) -> int:
    """Σ r·(in + out) over targeted linears in the adapted blocks."""
    shapes = facts.linear_shapes()
    layers = facts.num_layers if recipe.lora.num_layers < 0 else min(recipe.lora.num_layers, facts.num_layers)
    per_block = sum(recipe.lora.rank * sum(shapes[k]) for k in target_keys(facts, recipe.lora.keys) if k in shapes)
    return layers * per_block


def estimate(facts: ModelFacts, recipe: Recipe, seq_len: int = 0, dtype: str = "float32") -> MemoryEstimate:
    """Weights + adapter state + activations saved for backward for batches of `seq_len` tokens.

    `seq_len` is the longest padded batch expected (default: max_seq_length).
    """
    gb = 1024**3
    bits = recipe.model.quantize_bits
    weight_bytes = bits / 8 + 0.125 if bits else BYTES.get(dtype, 4)  # + group scales/biases
    tokens = recipe.train.batch_size * (seq_len or recipe.train.max_seq_length)
    h, i = facts.hidden_size, facts.intermediate_size
    per_token_layer = (8 * h + 3 * i) * 4  # saved inputs of norms, projections and the MLP
    if recipe.train.grad_checkpoint:
        per_token_layer = 2 * h * 4
    logits = tokens * facts.vocab_size * 4 * 3  # logits, log-softmax, their gradient
    trainable = lora_parameters(facts, recipe)
    return MemoryEstimate(
        weights_gb=facts.parameters * weight_bytes / gb,
        lora_gb=trainable * 16 / gb,
        activations_gb=(tokens * facts.num_layers * per_token_layer + logits) / gb,
        trainable=trainable,
    )
