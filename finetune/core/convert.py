"""Pure HF <-> MLX weight conversion: key tables, Conv1D transposes, tied embeddings, shards.

Our modules keep HuggingFace names, so a converted checkpoint has the keys of the HF
`*ForCausalLM` state dict: `model.layers.{i}.self_attn.q_proj.weight` for the Llama family and
`transformer.h.{i}.attn.c_attn.weight` for GPT-2 (the `transformer.` prefix is kept; bare GPT-2
checkpoints such as `gpt2` itself get it added). Differences from the HF files: buffers are
dropped, GPT-2's Conv1D weights are transposed to nn.Linear's (out, in), and a tied model has no
`lm_head.weight`. Nothing here reads files or mutates its arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import mlx.core as mx
from returns.result import Failure, Result, Success

SUPPORTED = ("llama", "mistral", "qwen2", "gpt2")

Shape = tuple[int, ...]
# (name, shape as symbols of the dims table, flag that must be true for the entry to exist)
Entry = tuple[str, tuple[str, ...], str]

_LLAMA_TOP: tuple[Entry, ...] = (
    ("model.embed_tokens.weight", ("V", "D"), ""),
    ("model.norm.weight", ("D",), ""),
    ("lm_head.weight", ("V", "D"), "untied"),
)
_LLAMA_LAYER: tuple[Entry, ...] = (
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
)
_GPT2_TOP: tuple[Entry, ...] = (
    ("transformer.wte.weight", ("V", "D"), ""),
    ("transformer.wpe.weight", ("P", "D"), ""),
    ("transformer.ln_f.weight", ("D",), ""),
    ("transformer.ln_f.bias", ("D",), ""),
    ("lm_head.weight", ("V", "D"), "untied"),
)
_GPT2_LAYER: tuple[Entry, ...] = (
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
)
# GPT-2 stores these as Conv1D (in, out); nn.Linear wants (out, in).
_GPT2_CONV1D = frozenset(
    {"attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"}
)


def _llama_dims(model_type: str, c: Mapping) -> dict[str, int]:
    """Sizes and flags of a Llama/Mistral/Qwen2 config, with HF's defaults."""
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    kv_heads = c.get("num_key_value_heads") or heads
    own_bias = model_type == "llama"  # Mistral has no bias flags; Qwen2 fixes them
    return {
        "L": c["num_hidden_layers"],
        "V": c["vocab_size"],
        "D": c["hidden_size"],
        "F": c["intermediate_size"],
        "Q": heads * head_dim,
        "K": kv_heads * head_dim,
        "untied": not c.get("tie_word_embeddings", False),
        "qkv_bias": model_type == "qwen2" or (own_bias and c.get("attention_bias", False)),
        "o_bias": own_bias and c.get("attention_bias", False),
        "mlp_bias": own_bias and c.get("mlp_bias", False),
    }


def _gpt2_dims(model_type: str, c: Mapping) -> dict[str, int]:
    """Sizes and flags of a GPT-2 config, with HF's defaults."""
    d = c["n_embd"]
    return {
        "L": c["n_layer"],
        "V": c["vocab_size"],
        "D": d,
        "D3": 3 * d,
        "P": c["n_positions"],
        "F": c.get("n_inner") or 4 * d,
        "untied": not c.get("tie_word_embeddings", True),
    }


def _llama_buffer(key: str) -> bool:
    return key.endswith(".rotary_emb.inv_freq")


def _gpt2_buffer(key: str) -> bool:
    parts = key.split(".")
    return parts[-2:] in (["attn", "bias"], ["attn", "masked_bias"]) or _llama_buffer(key)


class _Arch(NamedTuple):
    """Everything conversion needs to know about one model_type."""

    dims: Callable[[str, Mapping], dict[str, int]]
    top: tuple[Entry, ...]
    layer_prefix: str  # formatted with the block index
    layer: tuple[Entry, ...]
    embed: str  # the input embedding, which a tied head shares
    prefix: str  # HF base-model prefix that bare checkpoints lack
    buffer: Callable[[str], bool]
    conv1d: frozenset[str]


_LLAMA = _Arch(
    _llama_dims,
    _LLAMA_TOP,
    "model.layers.{}.",
    _LLAMA_LAYER,
    "model.embed_tokens.weight",
    "model.",
    _llama_buffer,
    frozenset(),
)
_GPT2 = _Arch(
    _gpt2_dims,
    _GPT2_TOP,
    "transformer.h.{}.",
    _GPT2_LAYER,
    "transformer.wte.weight",
    "transformer.",
    _gpt2_buffer,
    _GPT2_CONV1D,
)
_ARCHS = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "gpt2": _GPT2}


def _unsupported(model_type: str) -> str:
    return f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED)}"


def _arch(model_type: str) -> _Arch:
    if model_type not in _ARCHS:
        raise ValueError(_unsupported(model_type))
    return _ARCHS[model_type]


def _shapes(arch: _Arch, dims: Mapping[str, int]) -> dict[str, Shape]:
    def keep(entries: tuple[Entry, ...]) -> list[tuple[str, Shape]]:
        return [
            (n, tuple(dims[s] for s in sym)) for n, sym, flag in entries if not flag or dims[flag]
        ]

    layer = keep(arch.layer)
    out = dict(keep(arch.top))
    for i in range(dims["L"]):
        out.update({arch.layer_prefix.format(i) + name: shape for name, shape in layer})
    return out


def expected_shapes(model_type: str, config: Mapping) -> dict[str, Shape]:
    """Key -> shape of the converted (MLX-layout) weights; raises on bad type or config."""
    arch = _arch(model_type)
    return _shapes(arch, arch.dims(model_type, config))


def expected_keys(model_type: str, config: Mapping) -> frozenset[str]:
    """The exact key set `hf_to_mlx` produces for this config."""
    return frozenset(expected_shapes(model_type, config))


def _is_conv1d(arch: _Arch, key: str) -> bool:
    parts = key.split(".")  # transformer.h.{i}.attn.c_attn.weight
    return (
        len(parts) == 6 and parts[:2] == ["transformer", "h"] and ".".join(parts[3:]) in arch.conv1d
    )


def _canonical(arch: _Arch, key: str, roots: frozenset[str]) -> str:
    """Add the base-model prefix to bare keys (`h.0.ln_1.weight` -> `transformer.h.0...`)."""
    return arch.prefix + key if key.split(".")[0] in roots else key


def _listing(label: str, keys: set[str], limit: int = 10) -> str:
    names = sorted(keys)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return f"{label} {len(names)}: {', '.join(names[:limit])}{more}"


def hf_to_mlx(
    model_type: str, config: Mapping, weights: Mapping[str, mx.array]
) -> Result[dict[str, mx.array], str]:
    """HF checkpoint tensors -> our modules' weights, or a Failure naming the bad keys/shapes."""
    if model_type not in _ARCHS:
        return Failure(_unsupported(model_type))
    arch = _ARCHS[model_type]
    try:
        dims = arch.dims(model_type, config)
    except KeyError as e:
        return Failure(f"config for {model_type!r} lacks field {e.args[0]!r}")
    shapes = _shapes(arch, dims)
    roots = frozenset(k.split(".")[1] for k in shapes if k.startswith(arch.prefix))

    renamed: dict[str, mx.array] = {}
    for key, value in weights.items():
        if arch.buffer(key):
            continue
        name = _canonical(arch, key, roots)
        if name in renamed:
            return Failure(f"two checkpoint tensors map to {name!r} (one is {key!r})")
        renamed[name] = value

    if not dims["untied"] and "lm_head.weight" in renamed and arch.embed in renamed:
        head, embed = renamed.pop("lm_head.weight"), renamed[arch.embed]
        if head.shape != embed.shape or not mx.array_equal(head, embed).item():
            return Failure(
                f"config ties word embeddings but lm_head.weight differs from {arch.embed}"
            )

    unknown, missing = renamed.keys() - shapes.keys(), shapes.keys() - renamed.keys()
    if unknown or missing:
        parts = [
            _listing("unknown keys", unknown) if unknown else "",
            _listing("missing keys", missing) if missing else "",
        ]
        return Failure(
            f"{model_type} checkpoint does not match its config: "
            + "; ".join(p for p in parts if p)
        )

    for name, shape in shapes.items():  # compared in the checkpoint's own layout
        want = shape[::-1] if _is_conv1d(arch, name) else shape
        if tuple(renamed[name].shape) != want:
            return Failure(
                f"shape mismatch for {name}: expected {want}, got {tuple(renamed[name].shape)}"
            )

    return Success({k: v.T if _is_conv1d(arch, k) else v for k, v in renamed.items()})


def mlx_to_hf(
    model_type: str, config: Mapping, weights: Mapping[str, mx.array]
) -> dict[str, mx.array]:
    """Our weights -> HF checkpoint tensors (inverse of `hf_to_mlx` on canonical checkpoints)."""
    arch = _arch(model_type)
    return {k: v.T if _is_conv1d(arch, k) else v for k, v in weights.items()}


def merge_shards(shards: Sequence[Mapping[str, mx.array]]) -> Result[dict[str, mx.array], str]:
    """Union of shard dicts; a key present in two shards is a Failure."""
    merged: dict[str, mx.array] = {}
    owner: dict[str, int] = {}
    for i, shard in enumerate(shards):
        for key, value in shard.items():
            if key in merged:
                return Failure(f"tensor {key!r} appears in shard {owner[key]} and shard {i}")
            merged[key], owner[key] = value, i
    return Success(merged)


def cast_weights(weights: Mapping[str, mx.array], dtype: mx.Dtype) -> dict[str, mx.array]:
    """Floating-point tensors cast to `dtype`; integer tensors (quantized data) kept as they are."""
    return {
        k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()
    }
