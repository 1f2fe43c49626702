"""Everything FineTune knows about each HuggingFace `model_type`, declared once (pure).

Per model_type: how its config.json reads (sizes, flags, HF's defaults), its checkpoint's tensors
(symbolic shapes, biases and the flags that make them exist, buffers to drop, the tied embedding),
the linear layers of a block (LoRA targets) and which are GPT-2 `Conv1D`s stored transposed, where
the blocks live in HF's module tree and in mlx-lm's adapter files, and the MLX module file that
implements it. Conversion, model facts, memory estimates, LoRA targeting, fuse and PEFT conversion
read this table; adding an architecture means a row here and a module in `finetune/models/`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from returns.result import Failure, Result, Success

# (tensor name, shape as symbols of the dims table, flag of the dims table it needs, or "")
Entry = tuple[str, tuple[str, ...], str]


class Dims(NamedTuple):
    """A config's sizes and flags, HF's defaults applied (what every consumer reads)."""

    layers: int
    vocab: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    context: int
    tied: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False

    def symbols(self) -> dict[str, int]:
        """The symbols the shape tables use: L V D F Q K D3 P, and the bias/tie flags."""
        return {
            "L": self.layers, "V": self.vocab, "D": self.hidden, "F": self.intermediate,
            "Q": self.heads * self.head_dim, "K": self.kv_heads * self.head_dim,
            "D3": 3 * self.hidden, "P": self.context, "untied": not self.tied,
            "qkv_bias": self.qkv_bias, "o_bias": self.o_bias, "mlp_bias": self.mlp_bias,
        }


class Architecture(NamedTuple):
    """One family of model types that share a module file and a checkpoint layout."""

    family: str  # the naming family adapters are written in: "llama" or "gpt2"
    module: str  # the MLX module file: `finetune.models.<module>` (Model, args_from_config)
    read: Callable[[str, Mapping[str, Any]], Dims]  # config.json -> Dims (KeyError: missing field)
    top: tuple[Entry, ...]  # tensors outside the blocks
    layer: tuple[Entry, ...]  # tensors of one block, relative to `blocks.{i}.`
    linears: tuple[tuple[str, str, str], ...]  # (key path in a block, in symbol, out symbol)
    conv1d: frozenset[str]  # block linears stored (in, out) in HF checkpoints
    blocks: str  # where blocks live in HF's *ForCausalLM (= our module paths)
    adapter_blocks: str  # where mlx-lm's adapter files put them
    embed: str  # the input embedding, which a tied head shares
    prefix: str  # HF base-model prefix that bare checkpoints lack
    buffers: tuple[str, ...]  # key suffixes of non-parameter buffers to drop


def _read_llama(model_type: str, c: Mapping[str, Any]) -> Dims:
    heads = c["num_attention_heads"]
    own_bias = model_type == "llama"  # Mistral has no bias flags; Qwen2 fixes them
    return Dims(
        layers=c["num_hidden_layers"], vocab=c["vocab_size"], hidden=c["hidden_size"],
        intermediate=c["intermediate_size"], heads=heads,
        kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // heads,
        context=c.get("max_position_embeddings", 2048),
        tied=bool(c.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or (own_bias and bool(c.get("attention_bias", False))),
        o_bias=own_bias and bool(c.get("attention_bias", False)),
        mlp_bias=own_bias and bool(c.get("mlp_bias", False)),
    )


def _read_gpt2(model_type: str, c: Mapping[str, Any]) -> Dims:
    d, heads = c["n_embd"], c["n_head"]
    return Dims(
        layers=c["n_layer"], vocab=c["vocab_size"], hidden=d, intermediate=c.get("n_inner") or 4 * d,
        heads=heads, kv_heads=heads, head_dim=d // heads, context=c.get("n_positions", 1024),  # GPT2Config's default
        tied=bool(c.get("tie_word_embeddings", True)),
    )


LLAMA = Architecture(
    family="llama",
    module="llama",
    read=_read_llama,
    top=(
        ("model.embed_tokens.weight", ("V", "D"), ""),
        ("model.norm.weight", ("D",), ""),
        ("lm_head.weight", ("V", "D"), "untied"),
    ),
    layer=(
        ("input_layernorm.weight", ("D",), ""),
        ("self_attn.q_proj.weight", ("Q", "D"), ""),
        ("self_attn.k_proj.weight", ("K", "D"), ""),
        ("self_attn.v_proj.weight", ("K", "D"), ""),
        ("self_attn.o_proj.weight", ("D", "Q"), ""),
        ("self_attn.q_proj.bias", ("Q",), "qkv_bias"),
        ("self_attn.k_proj.bias", ("K",), "qkv_bias"),
        ("self_attn.v_proj.bias", ("K",), "qkv_bias"),
        ("self_attn.o_proj.bias", ("D",), "o_bias"),
        ("post_attention_layernorm.weight", ("D",), ""),
        ("mlp.gate_proj.weight", ("F", "D"), ""),
        ("mlp.up_proj.weight", ("F", "D"), ""),
        ("mlp.down_proj.weight", ("D", "F"), ""),
        ("mlp.gate_proj.bias", ("F",), "mlp_bias"),
        ("mlp.up_proj.bias", ("F",), "mlp_bias"),
        ("mlp.down_proj.bias", ("D",), "mlp_bias"),
    ),
    linears=(
        ("self_attn.q_proj", "D", "Q"), ("self_attn.k_proj", "D", "K"),
        ("self_attn.v_proj", "D", "K"), ("self_attn.o_proj", "Q", "D"),
        ("mlp.gate_proj", "D", "F"), ("mlp.up_proj", "D", "F"), ("mlp.down_proj", "F", "D"),
    ),
    conv1d=frozenset(),
    blocks="model.layers",
    adapter_blocks="model.layers",
    embed="model.embed_tokens.weight",
    prefix="model.",
    buffers=(".rotary_emb.inv_freq",),
)

GPT2 = Architecture(
    family="gpt2",
    module="gpt2",
    read=_read_gpt2,
    top=(
        ("transformer.wte.weight", ("V", "D"), ""),
        ("transformer.wpe.weight", ("P", "D"), ""),
        ("transformer.ln_f.weight", ("D",), ""),
        ("transformer.ln_f.bias", ("D",), ""),
        ("lm_head.weight", ("V", "D"), "untied"),
    ),
    layer=(
        ("ln_1.weight", ("D",), ""),
        ("ln_1.bias", ("D",), ""),
        ("attn.c_attn.weight", ("D3", "D"), ""),
        ("attn.c_attn.bias", ("D3",), ""),
        ("attn.c_proj.weight", ("D", "D"), ""),
        ("attn.c_proj.bias", ("D",), ""),
        ("ln_2.weight", ("D",), ""),
        ("ln_2.bias", ("D",), ""),
        ("mlp.c_fc.weight", ("F", "D"), ""),
        ("mlp.c_fc.bias", ("F",), ""),
        ("mlp.c_proj.weight", ("D", "F"), ""),
        ("mlp.c_proj.bias", ("D",), ""),
    ),
    linears=(
        ("attn.c_attn", "D", "D3"), ("attn.c_proj", "D", "D"),
        ("mlp.c_fc", "D", "F"), ("mlp.c_proj", "F", "D"),
    ),
    # HF stores these as Conv1D (in, out); nn.Linear wants (out, in).
    conv1d=frozenset({"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}),
    blocks="transformer.h",
    adapter_blocks="model.h",  # mlx-lm's GPT-2 calls the same module `model.`
    embed="transformer.wte.weight",
    prefix="transformer.",
    buffers=(".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq"),
)

REGISTRY: dict[str, Architecture] = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "gpt2": GPT2}
SUPPORTED = tuple(REGISTRY)
FAMILIES: dict[str, Architecture] = {a.family: a for a in REGISTRY.values()}


def unsupported(model_type: Any) -> str:
    return f"unsupported architecture {model_type!r}; supported: {', '.join(SUPPORTED)}"


def dims(config: Mapping[str, Any]) -> Result[Dims, str]:
    """A config.json's sizes and flags; a Failure names a missing or bad field."""
    kind = config.get("model_type")
    if kind not in REGISTRY:
        return Failure(unsupported(kind))
    try:
        return Success(REGISTRY[kind].read(kind, config))
    except KeyError as err:
        return Failure(f"config.json lacks field {err.args[0]!r} for model_type {kind!r}")
    except (TypeError, ValueError, ZeroDivisionError) as err:
        return Failure(f"config.json: bad field for model_type {kind!r} ({err})")


def linear_shapes(arch: Architecture, d: Dims) -> dict[str, tuple[int, int]]:
    """`{key path within a block: (in_features, out_features)}` of every linear layer."""
    s = d.symbols()
    return {path: (s[i], s[o]) for path, i, o in arch.linears}


def family_of_blocks(prefix: str) -> Architecture:
    """The family whose blocks live at `prefix` (`transformer.h` -> gpt2, else llama)."""
    return next((a for a in FAMILIES.values() if prefix.startswith(a.blocks)), LLAMA)
