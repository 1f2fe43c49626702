"""What a HuggingFace `config.json` says about a model: sizes, linear shapes, parameter count.

Read through the architecture registry (`core/architectures.py`), which declares each
model_type's config fields, defaults and linear layers once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from msgspec import Struct
from returns.result import Result

from finetune.core import architectures

SUPPORTED = architectures.SUPPORTED


class ModelFacts(Struct, frozen=True, kw_only=True):
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    context_length: int
    tied_embeddings: bool
    # Architectures outside the registry (the torch engine trains any transformers has): a block's
    # linear layers `(path, in, out)` and the parameter count, read from transformers' own modules.
    linears: tuple[tuple[str, int, int], ...] = ()
    counted: int = 0

    @property
    def architecture(self) -> architectures.Architecture:
        return architectures.REGISTRY[self.model_type]

    def dims(self) -> architectures.Dims:
        return architectures.Dims(
            layers=self.num_layers, vocab=self.vocab_size, hidden=self.hidden_size,
            intermediate=self.intermediate_size, heads=self.num_heads, kv_heads=self.num_kv_heads,
            head_dim=self.head_dim, context=self.context_length, tied=self.tied_embeddings,
        )

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """`{key path within a block: (in_features, out_features)}` of every linear layer."""
        if self.linears:
            return {path: (i, o) for path, i, o in self.linears}
        return architectures.linear_shapes(self.architecture, self.dims())

    @property
    def parameters(self) -> int:
        """Weights of the base model (norms and biases included approximately)."""
        if self.counted:
            return self.counted
        block = sum(a * b for a, b in self.linear_shapes().values()) + 4 * self.hidden_size
        embed = self.vocab_size * self.hidden_size
        if any(name == "P" for _, shape, _ in self.architecture.top for name in shape):
            embed += self.context_length * self.hidden_size  # learned positions (GPT-2)
        head = 0 if self.tied_embeddings else self.vocab_size * self.hidden_size
        return self.num_layers * block + embed + head + self.hidden_size


def facts(config: Mapping[str, Any]) -> Result[ModelFacts, str]:
    """Read a config dict; unsupported architectures and missing fields are failures."""
    return architectures.dims(config).map(lambda d: ModelFacts(
        model_type=config["model_type"], hidden_size=d.hidden, num_layers=d.layers,
        num_heads=d.heads, num_kv_heads=d.kv_heads, head_dim=d.head_dim,
        intermediate_size=d.intermediate, vocab_size=d.vocab, context_length=d.context,
        tied_embeddings=d.tied, counted=_exact_count(config),
    ))


def _exact_count(config: Mapping[str, Any]) -> int:
    """The checkpoint's parameters from its tensor table, as training counts them (0: not readable)."""
    from math import prod

    from finetune.core.convert import expected_shapes

    try:
        return sum(prod(shape) for shape in expected_shapes(config["model_type"], config).values())
    except (KeyError, ValueError, TypeError):
        return 0
