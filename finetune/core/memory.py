"""The peak memory of a LoRA training run, from model facts, the recipe and the batch shape (pure).

Peak = weights (quantized linears as packed words + per-group scales and biases) + adapter state
(parameters, gradients, the accumulated gradient, Adam's two moments) + activations. Activations
are counted in elements of the compute dtype and multiplied by how many copies MLX keeps: every
block's saved tensors (only its input with gradient checkpointing, plus the one block being
recomputed), one block's backward temporaries, and one chunk of logits at supervised positions (`core.headloss`).
The copy counts were fitted to `mx.get_peak_memory()` of real train steps on MLX-CPU, where
attention materialises its (B, H, T, T) scores (`benchmarks/memory.py`, `tests/test_memory.py`).
"""

from __future__ import annotations

from collections.abc import Mapping

from msgspec import Struct

from finetune.core import headloss, lora
from finetune.core.config import Recipe
from finetune.core.modelinfo import ModelFacts

BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
GB = 10**9  # every size FineTune prints or writes is in GB of 10^9 bytes (as mlx-lm's "Peak mem")
ADAPTER_COPIES = 4  # parameters, gradients, Adam's m and v (+1 accumulated gradient when accumulating)
# Copies of each activation term MLX-CPU keeps at the peak (fitted; see the module docstring).
COPIES = {
    "saved_mlp": 7.7,  # per saved block: (B, T, intermediate) (absorbs its (B, T, hidden) tensors)
    "saved_scores": 0.12,  # per saved block: (B, H, T, T) attention probabilities
    "inputs": 1.0,  # checkpointing: each block's (B, T, hidden) input
    "block_mlp": 10.0,  # the working set of the block whose backward runs, (B, T, intermediate)
    "block_scores": 3.5,  # and its (B, H, T, T) scores, probabilities and their gradients
    "logits": 3.5,  # (N, vocab) float32 logits, log-softmax and their gradient
    "adapter_inner": 0.5,  # x·A for every adapted linear, (B, T, rank)
}


class MemoryEstimate(Struct, frozen=True, kw_only=True):
    """GB of each part and their total for micro-batches of `batch_size` × `seq_len` tokens."""

    weights_gb: float
    lora_gb: float  # adapters (or, full: trained weights' gradients) + accumulated gradients + Adam moments
    activations_gb: float
    total_gb: float
    trainable: int
    batch_size: int
    seq_len: int
    grad_checkpoint: bool
    fine_tune_type: str = "lora"  # full: `lora_gb` is the trained weights' gradients and Adam state


def target_keys(facts: ModelFacts, keys: tuple[str, ...]) -> tuple[str, ...]:
    """Resolve `all-linear` into the block's linear key paths; keep explicit keys as given."""
    return lora.resolve_keys(keys, tuple(facts.linear_shapes()))


def adapted_layers(facts: ModelFacts, recipe: Recipe) -> int:
    n = recipe.lora.num_layers
    return facts.num_layers if n < 0 else min(n, facts.num_layers)


def block_parameters(facts: ModelFacts) -> int:
    """The parameters of one block: all but the embeddings (and an untied head), shared alike.

    Every block of a registry model has the same shapes; what is not a block is the token
    embedding, an untied head and a final norm, whose few weights are counted in the blocks' share.
    """
    outside = facts.vocab_size * facts.hidden_size * (1 if facts.tied_embeddings else 2)
    linears = sum(i * o for i, o in facts.linear_shapes().values())
    return max((facts.parameters - outside) // max(facts.num_layers, 1), linears)


def full_parameters(facts: ModelFacts, recipe: Recipe) -> int:
    """The weights a full fine-tune trains: every parameter of the last `num_layers` blocks."""
    return adapted_layers(facts, recipe) * block_parameters(facts)


def trainable_parameters(facts: ModelFacts, recipe: Recipe) -> int:
    """What the recipe trains: the blocks' weights (`full`) or the LoRA/DoRA parameters."""
    if recipe.lora.fine_tune_type == "full":
        return full_parameters(facts, recipe)
    return lora_parameters(facts, recipe)


def lora_parameters(facts: ModelFacts, recipe: Recipe) -> int:
    """Σ r·(in + out) over targeted linears in the adapted blocks (DoRA: + out, its magnitudes)."""
    shapes = facts.linear_shapes()
    targeted = {k: shapes[k] for k in target_keys(facts, recipe.lora.keys) if k in shapes}
    magnitudes = sum(out for _, out in targeted.values()) if recipe.lora.fine_tune_type == "dora" else 0
    return adapted_layers(facts, recipe) * (lora.count(targeted, recipe.lora.rank) + magnitudes)


def weight_bytes(facts: ModelFacts, bits: int, group_size: int, dtype: str) -> float:
    """Bytes of the base weights; with `bits`, linears whose input divides by the group are packed."""
    size = BYTES.get(dtype, 4)
    if not bits:
        return facts.parameters * size
    packed = bits / 8 + 2 * size / group_size  # packed weight + a scale and a bias per group
    shapes = list(facts.linear_shapes().values()) * facts.num_layers
    if not facts.tied_embeddings:
        shapes.append((facts.hidden_size, facts.vocab_size))
    quantized = sum(i * o for i, o in shapes if i % group_size == 0)
    return quantized * packed + (facts.parameters - quantized) * size


def activation_terms(
    facts: ModelFacts, recipe: Recipe, batch: int, seq_len: int, supervised: int
) -> dict[str, float]:
    """Elements of each activation term (see COPIES) for one micro-batch."""
    tokens = batch * seq_len
    hidden, mlp = tokens * facts.hidden_size, tokens * facts.intermediate_size
    scores = batch * facts.num_heads * seq_len * seq_len
    checkpoint = recipe.train.grad_checkpoint
    full = recipe.lora.fine_tune_type == "full"
    # with checkpointing, the block recomputed; a full fine-tune's frozen first blocks need no backward
    saved = 1 if checkpoint else adapted_layers(facts, recipe) if full else facts.num_layers
    inner = 0 if full else len(target_keys(facts, recipe.lora.keys)) * recipe.lora.rank * tokens
    return {
        "saved_mlp": saved * mlp,
        "saved_scores": saved * scores,
        "inputs": facts.num_layers * hidden if checkpoint else 0,
        "block_mlp": mlp,
        "block_scores": scores,
        "logits": min(supervised, headloss.chunk_rows(facts.vocab_size)) * facts.vocab_size,  # one chunk's
        "adapter_inner": adapted_layers(facts, recipe) * inner,
    }


def estimate(
    facts: ModelFacts,
    recipe: Recipe,
    seq_len: int = 0,
    dtype: str = "float32",
    supervised: int = 0,
    batch_size: int = 0,
    copies: Mapping[str, float] = COPIES,
    trained_dtype: str | None = None,
    activation_bytes: float | None = None,
) -> MemoryEstimate:
    """Peak training memory for micro-batches of `batch_size` rows padded to `seq_len` tokens.

    `seq_len`: the longest padded batch the plan produces (default: max_seq_length, else the context);
    `supervised`: the most supervised positions in one micro-batch (default: every token);
    `batch_size`: the micro-batch (default: the recipe's batch_size); `copies`: the engine's
    copy counts (default: MLX's; the torch engine's are `engines/torch/budget.COPIES`);
    `trained_dtype`: what a full fine-tune's trained weights and their state are held in (default:
    `dtype`, as MLX and mlx-lm train; the torch engine trains a half-precision base's blocks in float32);
    `activation_bytes`: the element size the activation copies are counted in (default: `dtype`'s).
    """
    batch = batch_size or recipe.train.batch_size
    seq = seq_len or recipe.train.max_seq_length or facts.context_length  # 0: the model's context
    n = supervised or batch * seq
    size = BYTES.get(dtype, 4)
    terms = activation_terms(facts, recipe, batch, seq, n)
    logits = copies["logits"] * terms.pop("logits") * 4  # the loss is always float32
    act_size = activation_bytes or size
    activations = sum(copies[k] * v for k, v in terms.items()) * act_size + logits
    activations += packed_bytes(facts, recipe, batch, seq, act_size)
    trainable = trainable_parameters(facts, recipe)
    weights = weight_bytes(facts, recipe.model.quantize_bits, group_size(recipe), dtype)
    accumulating = recipe.train.grad_accumulation > 1 or batch < recipe.train.batch_size  # micro-steps
    if recipe.lora.fine_tune_type == "full":  # the weights are counted already: + gradient, m, v, and
        # the update's new weights and moments before the old ones are freed (measured: about one copy more)
        trained_size = BYTES.get(trained_dtype or dtype, 4)
        weights += trainable * (trained_size - size)  # the trained blocks, cast up where they train in float32
        lora = trainable * trained_size * (ADAPTER_COPIES + accumulating)
    else:
        lora = trainable * 4 * (ADAPTER_COPIES + accumulating)
    return MemoryEstimate(
        weights_gb=weights / GB, lora_gb=lora / GB, activations_gb=activations / GB,
        total_gb=(weights + lora + activations) / GB, trainable=trainable,
        batch_size=batch, seq_len=seq, grad_checkpoint=recipe.train.grad_checkpoint,
        fine_tune_type=recipe.lora.fine_tune_type,
    )


def trained_state(est: MemoryEstimate) -> str:
    """What `lora_gb` holds, in words: "LoRA adapters, their gradients and Adam state" or the full
    fine-tune's "gradients and Adam state of N trained weights"."""
    if est.fine_tune_type == "full":
        return f"{est.trainable:,} trained weights (full fine-tune): their gradients and Adam state {est.lora_gb:.3g} GB"
    name = {"lora": "LoRA", "dora": "DoRA"}.get(est.fine_tune_type, est.fine_tune_type)
    return f"{est.trainable:,} {name} parameters with their gradients and Adam state {est.lora_gb:.3g} GB"


# What `--packing` adds (MLX-CPU, fitted like COPIES; tests/test_readme_claims.py measures it): with
# per-token positions every saved block keeps rotated copies of q and k, (B, T, (H + KV) · head_dim),
# and the per-document boolean mask is applied to the (B, H, T, T) scores.
PACKED_COPIES = {"positions": 6.3, "mask": 0.34}


def packed_bytes(facts: ModelFacts, recipe: Recipe, batch: int, seq_len: int, size: int) -> float:
    """Bytes `--packing` adds to a micro-batch's activations (0 without packing)."""
    if not recipe.data.packing:
        return 0.0
    saved = 1 if recipe.train.grad_checkpoint else facts.num_layers
    rotated = saved * batch * seq_len * (facts.num_heads + facts.num_kv_heads) * facts.head_dim
    scores = batch * facts.num_heads * seq_len * seq_len
    return (PACKED_COPIES["positions"] * rotated + PACKED_COPIES["mask"] * scores) * size


def group_size(recipe: Recipe) -> int:
    return recipe.model.quantize_group_size
