"""What a HuggingFace `config.json` says about a model: sizes, linear shapes, parameter count."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from msgspec import Struct
from returns.result import Failure, Result, Success

SUPPORTED = ("llama", "mistral", "qwen2", "gpt2")


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

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """`{key path within a block: (in_features, out_features)}` of every linear layer."""
        h, hd, i = self.hidden_size, self.head_dim, self.intermediate_size
        if self.model_type == "gpt2":
            return {"attn.c_attn": (h, 3 * h), "attn.c_proj": (h, h), "mlp.c_fc": (h, i), "mlp.c_proj": (i, h)}
        q, kv = self.num_heads * hd, self.num_kv_heads * hd
        return {
            "self_attn.q_proj": (h, q), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
            "self_attn.o_proj": (q, h), "mlp.gate_proj": (h, i), "mlp.up_proj": (h, i),
            "mlp.down_proj": (i, h),
        }

    @property
    def parameters(self) -> int:
        """Weights of the base model (norms and biases included approximately)."""
        block = sum(a * b for a, b in self.linear_shapes().values()) + 4 * self.hidden_size
        embed = self.vocab_size * self.hidden_size
        if self.model_type == "gpt2":
            embed += self.context_length * self.hidden_size
        head = 0 if self.tied_embeddings else self.vocab_size * self.hidden_size
        return self.num_layers * block + embed + head + self.hidden_size


def facts(config: Mapping[str, Any]) -> Result[ModelFacts, str]:
    """Read a config dict; unsupported architectures and missing fields are failures."""
    kind = config.get("model_type")
    if kind not in SUPPORTED:
        return Failure(f"unsupported architecture {kind!r}; supported: {', '.join(SUPPORTED)}")
    try:
        if kind == "gpt2":
            h = int(config["n_embd"])
            return Success(ModelFacts(
                model_type=kind, hidden_size=h, num_layers=int(config["n_layer"]),
                num_heads=int(config["n_head"]), num_kv_heads=int(config["n_head"]),
                head_dim=h // int(config["n_head"]), intermediate_size=int(config.get("n_inner") or 4 * h),
                vocab_size=int(config["vocab_size"]), context_length=int(config.get("n_positions", 1024)),
                tied_embeddings=True,
            ))
        heads = int(config["num_attention_heads"])
        h = int(config["hidden_size"])
        return Success(ModelFacts(
            model_type=kind, hidden_size=h, num_layers=int(config["num_hidden_layers"]),
            num_heads=heads, num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or h // heads),
            intermediate_size=int(config["intermediate_size"]), vocab_size=int(config["vocab_size"]),
            context_length=int(config.get("max_position_embeddings", 2048)),
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        ))
    except (KeyError, TypeError, ValueError) as err:
        return Failure(f"config.json: missing or bad field {err} for model_type {kind!r}")
