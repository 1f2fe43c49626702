"""How each architecture differs from the others, one declarative row per model_type (pure).

A `Layout` names HF's modules (so weights load rename-free); a `Row` says which config fields
mean what and how the family computes (norm kind and weight offset, q/k norms, biases, activation,
scales, soft-caps, sliding-window pattern, rotary variant and share, parallel residual). `spec`
resolves a config.json against its row into a `Decoder`, everything the one MLX decoder reads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from msgspec import Struct

from finetune.core import arch_rope
from finetune.core.arch_rope import Rope

ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu")


class Layout(NamedTuple):
    """HF module names; "" = the module does not exist in this family."""

    backbone: str = "model"
    embed: str = "embed_tokens"
    positions: str = ""  # learned position embeddings (GPT-2's wpe)
    layers: str = "layers"
    final_norm: str = "norm"
    head: str = "lm_head"  # the untied output projection, top level
    attn: str = "self_attn"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    qkv: str = ""  # one fused projection instead of q/k/v
    qkv_order: str = "split"  # "split": [q | k | v]; "heads": per head [q k v] (GPT-NeoX)
    o: str = "o_proj"
    mlp: str = "mlp"
    gate: str = "gate_proj"  # "" = an ungated MLP (down(act(up(x))))
    up: str = "up_proj"
    gate_up: str = ""  # one fused [gate | up] projection (Phi-3)
    down: str = "down_proj"
    attn_in: str = "input_layernorm"  # norm before attention
    attn_out: str = ""  # norm of the attention output, before the residual add
    mlp_in: str = "post_attention_layernorm"
    mlp_out: str = ""


GEMMA2_LAYOUT = Layout(attn_out="post_attention_layernorm", mlp_in="pre_feedforward_layernorm",
                       mlp_out="post_feedforward_layernorm")


class Row(NamedTuple):
    """A family's fixed traits and the config fields (with HF's defaults) that set the rest."""

    layout: Layout = Layout()
    norm: str = "rms"  # or "layer" (LayerNorm with bias)
    offset: float = 0.0  # norm weight applied as (offset + w): Gemma's 1
    eps: tuple[str, float] = ("rms_norm_eps", 1e-6)
    act: tuple[str, str] = ("hidden_act", "silu")
    qk_norm: str = ""  # "head": over head_dim after the split; "full": over Q/K after the projection
    bias: tuple[str, str, str] = ("attention_bias", "attention_bias", "mlp_bias")  # qkv, o, mlp:
    bias_default: bool = False  # a config field, or "yes"/"no"
    tied: bool = False  # tie_word_embeddings' default
    head_dim: int = 0  # head_dim's default (0: hidden / heads)
    embed_scale: str = ""  # "sqrt": sqrt(hidden) (Gemma); else a config field (Granite)
    query_scale: str = ""  # config field: "query_pre_attn_scalar" (scale^-0.5) or a multiplier
    attn_softcap: tuple[str, float] = ("", 0.0)
    final_softcap: tuple[str, float] = ("", 0.0)
    residual_scale: str = ""  # config field multiplying each branch (Granite)
    logits_scale: str = ""  # config field dividing the logits (Granite)
    parallel: tuple[str, bool] = ("", False)  # x + attn(ln1 x) + mlp(ln2 x) (GPT-NeoX)
    theta: float = 10000.0
    partial: float = 1.0  # partial_rotary_factor's default
    windows: Callable[[Mapping[str, Any], int], tuple[int, ...]] = lambda c, n: (0,) * n
    rope_types: Callable[[Mapping[str, Any], int], tuple[str, ...]] = lambda c, n: ("full_attention",) * n
    rope_layers: Callable[[Mapping[str, Any], int], list[int]] | None = None  # 1 = the layer rotates
    learned_positions: bool = False  # GPT-2's wpe instead of RoPE
    fixups: tuple[Callable[[Mapping[str, Any]], Mapping[str, Any]], ...] = ()  # old spellings -> HF's reading


class Decoder(Struct, frozen=True, kw_only=True):
    """A config resolved against its row: what `finetune.engines.mlx.decoder` builds."""

    model_type: str
    layout: tuple[str, ...]  # Layout's fields
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    context: int
    tied: bool
    norm: str
    offset: float
    eps: float
    act: str
    qk_norm: str
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    embed_scale: float
    query_scale: float
    attn_softcap: float
    final_softcap: float
    residual_scale: float
    logits_scale: float
    parallel: bool
    windows: tuple[int, ...]  # per layer, 0 = full attention
    ropes: tuple[Rope, ...]  # per layer; kind "none" for learned or no positions

    @property
    def names(self) -> Layout:
        return Layout(*self.layout)


def flag(c: Mapping[str, Any], spec: str, default: bool) -> bool:
    """A bias rule: "yes", "no" or a config field."""
    return spec == "yes" or (spec != "no" and bool(c.get(spec, default)))


# Sliding windows: which layers have one, as each family's HF code decides.
def every_layer(default: int | None = None) -> Callable[[Mapping[str, Any], int], tuple[int, ...]]:
    """Mistral (default 4096), Phi-3, Starcoder2: `sliding_window` on all layers (layer_types ignored)."""
    return lambda c, n: (c.get("sliding_window", default) or 0,) * n


def by_types(derive: Callable[[Mapping[str, Any], int], list[str]], gate: str = ""):
    """`layer_types` (transformers 5) or the family's derivation; the window is `sliding_window`
    (when `gate` is a config flag, only if it is set)."""

    def windows(c: Mapping[str, Any], n: int) -> tuple[int, ...]:
        window = (c.get("sliding_window") or 0) if not gate or c.get(gate, False) else 0
        types = c.get("layer_types") or derive(c, n)
        return tuple(window if t == "sliding_attention" else 0 for t in types)

    return windows


def qwen_types(c: Mapping[str, Any], n: int) -> list[str]:
    first = c.get("max_window_layers", 28)
    return ["sliding_attention" if i >= first else "full_attention" for i in range(n)]


def pattern_types(every: int) -> Callable[[Mapping[str, Any], int], list[str]]:
    """Every `every`-th layer full, the rest sliding (Gemma 2: 2; Gemma 3: `sliding_window_pattern`)."""

    def types(c: Mapping[str, Any], n: int) -> list[str]:
        k = c.get("sliding_window_pattern", every)
        return ["sliding_attention" if (i + 1) % k else "full_attention" for i in range(n)]

    return types


def no_rope(c: Mapping[str, Any], n: int) -> list[int]:
    """SmolLM3's `no_rope_layers`: 1 = the layer uses RoPE."""
    k = c.get("no_rope_layer_interval", 4)
    return list(c.get("no_rope_layers") or [int((i + 1) % k != 0) for i in range(n)])


def smollm3_types(c: Mapping[str, Any], n: int) -> list[str]:
    ropes = no_rope(c, n)
    sliding = c.get("use_sliding_window", False) and c.get("sliding_window") is not None
    return ["sliding_attention" if sliding and not ropes[i] else "full_attention" for i in range(n)]


# Config fixups: what HF's config class does to a family's old or hub spellings before reading.
def gemma_tanh_gelu(c: Mapping[str, Any]) -> Mapping[str, Any]:
    """GemmaConfig turns the legacy `hidden_act: gelu` into the tanh form it always meant."""
    return dict(c) | {"hidden_act": "gelu_pytorch_tanh"} if c.get("hidden_act") == "gelu" else c


def gemma3_hub_rope(c: Mapping[str, Any]) -> Mapping[str, Any]:
    """Hub Gemma 3: `rope_theta`/`rope_scaling` for global layers, `rope_local_base_freq` for local."""
    if isinstance((c.get("rope_parameters") or {}).get("full_attention"), Mapping):
        return c
    return dict(c) | {"rope_parameters": {
        "full_attention": dict(c.get("rope_scaling") or {}) | {"rope_theta": c.get("rope_theta", 1e6)},
        "sliding_attention": {"rope_type": "default", "rope_theta": c.get("rope_local_base_freq", 1e4)},
    }}


# Gemma3TextConfig's defaults: hub image-text configs nest only what differs (4B: sizes, window, rope_scaling).
GEMMA3_TEXT_DEFAULTS: Mapping[str, Any] = {
    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072, "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 256, "sliding_window": 4096,
}


def gemma3_text_part(c: Mapping[str, Any]) -> Mapping[str, Any]:
    """Gemma 3 image-text (`gemma3`): the nested `text_config` over Gemma3TextConfig's defaults; the
    top-level `tie_word_embeddings` (default true) ties the head, as Gemma3ForConditionalGeneration reads it."""
    text = c.get("text_config") or {}
    if not isinstance(text, Mapping):
        raise ValueError(f"text_config must be an object, got {type(text).__name__}")
    return dict(GEMMA3_TEXT_DEFAULTS) | dict(text) | {"tie_word_embeddings": c.get("tie_word_embeddings", True)}


def phi3_longrope(c: Mapping[str, Any]) -> Mapping[str, Any]:
    """Phi3Config reads old checkpoints' "su"/"yarn" scaling as longrope."""
    raw = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if raw.get("rope_type", raw.get("type")) not in ("su", "yarn"):
        return c
    return dict(c) | {"rope_parameters": dict(raw) | {"rope_type": "longrope"}}


def _ropes(row: Row, c: Mapping[str, Any], n: int, head_dim: int) -> tuple[Rope, ...]:
    if row.learned_positions:
        return (Rope(kind="none"),) * n
    theta = c.get("rotary_emb_base", row.theta)
    partial = c.get("rotary_pct", row.partial)
    types = row.rope_types(c, n)
    kinds = {t: arch_rope.read(c, arch_rope.parameters(c, t, theta), head_dim, partial) for t in set(types)}
    uses = row.rope_layers(c, n) if row.rope_layers else [1] * n
    return tuple(kinds[t] if use else Rope(kind="none") for t, use in zip(types, uses, strict=True))


def _number(c: Mapping[str, Any], field: tuple[str, float]) -> float:
    """A config number with the row's default; None or an absent field means 0 (off)."""
    return float(c.get(field[0], field[1]) or 0.0) if field[0] else 0.0


def spec(model_type: str, row: Row, sizes: Any, c: Mapping[str, Any]) -> Decoder:
    """Resolve config.json `c` (sizes already read into `sizes`, a Dims) against `row`."""
    n = sizes.layers
    for fixup in row.fixups:
        c = fixup(c)
    act = c.get(row.act[0]) or row.act[1]
    if act not in ACTIVATIONS:
        raise ValueError(f"activation {act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    if c.get("add_cross_attention", False) or c.get("scale_attn_by_inverse_layer_idx", False):
        raise ValueError(f"{model_type}: cross-attention and scale_attn_by_inverse_layer_idx are not supported")
    scale = sizes.head_dim**-0.5
    if row.query_scale == "query_pre_attn_scalar":
        scale = float(c.get("query_pre_attn_scalar", 256)) ** -0.5
    elif row.query_scale == "scale_attn_weights":  # GPT-2: a flag, off = no scaling
        scale = scale if c.get("scale_attn_weights", True) else 1.0
    elif row.query_scale:
        scale = float(c.get(row.query_scale, 1.0))
    embed = math.sqrt(sizes.hidden) if row.embed_scale == "sqrt" else float(c.get(row.embed_scale, 1.0)) if row.embed_scale else 1.0
    windows = row.windows(c, n)
    if len(windows) != n:
        raise ValueError(f"layer_types has {len(windows)} entries for {n} layers")
    return Decoder(
        model_type=model_type, layout=tuple(row.layout), vocab=sizes.vocab, hidden=sizes.hidden,
        intermediate=sizes.intermediate, layers=n, heads=sizes.heads, kv_heads=sizes.kv_heads,
        head_dim=sizes.head_dim, context=sizes.context, tied=sizes.tied, norm=row.norm, offset=row.offset,
        eps=float(c.get(row.eps[0]) or row.eps[1]), act=act, qk_norm=row.qk_norm,
        qkv_bias=sizes.qkv_bias, o_bias=sizes.o_bias, mlp_bias=sizes.mlp_bias, embed_scale=embed,
        query_scale=scale, attn_softcap=_number(c, row.attn_softcap), final_softcap=_number(c, row.final_softcap),
        residual_scale=float(c.get(row.residual_scale, 1.0)) if row.residual_scale else 1.0,
        logits_scale=float(c.get(row.logits_scale, 1.0)) if row.logits_scale else 1.0,
        parallel=bool(c.get(row.parallel[0], row.parallel[1])) if row.parallel[0] else False,
        windows=windows, ropes=_ropes(row, c, n, sizes.head_dim),
    )
