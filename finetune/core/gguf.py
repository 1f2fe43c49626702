"""llama.cpp GGUF <-> HuggingFace, both ways (pure): architectures, tensor names, config, Q/K rows.

A GGUF file carries its config as key/value metadata under llama.cpp's names (`llama.block_count`,
`llama.rope.freq_base`, ...) and its tensors under llama.cpp's names (`blk.3.attn_q.weight`). The
tensor shapes here are in NumPy/HF order (rows first), the reverse of GGUF's `ne` order. Two value
changes sit between the layouts: the Llama family's Q/K rows are permuted (llama.cpp's rotary
pairs adjacent dims, HF's rotate-half pairs dims `d/2` apart) and Gemma's norm gains are stored
with the `1 +` HF applies at run time. Nothing here reads files or mutates its arguments.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
from returns.result import Failure, Result, Success

from finetune.core import gguf_rope
from finetune.core.gguf_rope import llama3_from_factors, llama3_rope_factors  # noqa: F401 (this module's API)

# GGUF `general.architecture` -> HF `model_type`. llama.cpp writes Mistral as `llama`.
ARCHITECTURES: dict[str, str] = {
    "llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
    "gemma3": "gemma3_text", "phi3": "phi3", "olmo2": "olmo2",
}
# HF `model_type` -> GGUF `general.architecture`.
GGUF_ARCHITECTURES: dict[str, str] = {hf: g for g, hf in ARCHITECTURES.items()} | {"mistral": "llama"}
HF_CLASSES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM", "olmo2": "Olmo2ForCausalLM",
}
PERMUTED = frozenset({"llama"})  # GGUF archs whose Q/K rows llama.cpp permutes
NORM_OFFSET = {"gemma2": 1.0, "gemma3": 1.0}  # GGUF norm gain = HF gain + offset


class Tensor(NamedTuple):
    gguf: str  # name inside a block (`attn_q.weight`) or at the top
    hf: str | None  # HF name (None: llama.cpp-only, such as rope_freqs)
    shape: tuple[str, ...]  # symbols of `_symbols`
    required: bool = True


_TOP = (
    Tensor("token_embd.weight", "model.embed_tokens.weight", ("V", "D")),
    Tensor("output_norm.weight", "model.norm.weight", ("D",)),
    Tensor("output.weight", "lm_head.weight", ("V", "D"), required=False),
    Tensor("rope_freqs.weight", None, ("R",), required=False),
)


def _linear(gguf: str, hf: str, out: str, inp: str) -> tuple[Tensor, ...]:
    return (Tensor(f"{gguf}.weight", f"{hf}.weight", (out, inp)),
            Tensor(f"{gguf}.bias", f"{hf}.bias", (out,), required=False))


def _norm(gguf: str, hf: str, size: str = "D") -> Tensor:
    return Tensor(f"{gguf}.weight", f"{hf}.weight", (size,))


_ATTN = (
    *_linear("attn_q", "self_attn.q_proj", "Q", "D"), *_linear("attn_k", "self_attn.k_proj", "K", "D"),
    *_linear("attn_v", "self_attn.v_proj", "K", "D"), *_linear("attn_output", "self_attn.o_proj", "D", "Q"),
)
_MLP = (
    *_linear("ffn_gate", "mlp.gate_proj", "F", "D"), *_linear("ffn_up", "mlp.up_proj", "F", "D"),
    *_linear("ffn_down", "mlp.down_proj", "D", "F"),
)
_LLAMA = (_norm("attn_norm", "input_layernorm"), *_ATTN, _norm("ffn_norm", "post_attention_layernorm"), *_MLP)
_QK_NORM = (_norm("attn_q_norm", "self_attn.q_norm", "H"), _norm("attn_k_norm", "self_attn.k_norm", "H"))
_GEMMA2 = (
    _norm("attn_norm", "input_layernorm"), *_ATTN, _norm("post_attention_norm", "post_attention_layernorm"),
    _norm("ffn_norm", "pre_feedforward_layernorm"), *_MLP, _norm("post_ffw_norm", "post_feedforward_layernorm"),
)
BLOCKS: dict[str, tuple[Tensor, ...]] = {
    "llama": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA + _QK_NORM,
    "gemma2": _GEMMA2,
    "gemma3": _GEMMA2 + _QK_NORM,
    "phi3": (
        _norm("attn_norm", "input_layernorm"), *_linear("attn_qkv", "self_attn.qkv_proj", "QKV", "D"),
        *_linear("attn_output", "self_attn.o_proj", "D", "Q"), _norm("ffn_norm", "post_attention_layernorm"),
        *_linear("ffn_up", "mlp.gate_up_proj", "F2", "D"), *_linear("ffn_down", "mlp.down_proj", "D", "F"),
    ),
    "olmo2": (
        *_ATTN, _norm("attn_q_norm", "self_attn.q_norm", "Q"), _norm("attn_k_norm", "self_attn.k_norm", "K"),
        _norm("post_attention_norm", "post_attention_layernorm"), *_MLP,
        _norm("post_ffw_norm", "post_feedforward_layernorm"),
    ),
}


def supported(arch: str) -> Result[str, str]:
    """The HF model_type of a GGUF architecture, or a one-line refusal."""
    if arch in ARCHITECTURES:
        return Success(ARCHITECTURES[arch])
    return Failure(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")


def _block(name: str, prefix: str) -> tuple[int, str] | None:
    """`prefix` + `3.rest` -> (3, "rest"); None otherwise (no leading zeros: names stay unique)."""
    if not name.startswith(prefix):
        return None
    index, _, inner = name[len(prefix):].partition(".")
    if not index.isdigit() or str(int(index)) != index or not inner:
        return None
    return int(index), inner


def to_hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None when unmapped."""
    for t in _TOP:
        if t.gguf == gguf_name:
            return t.hf
    found = _block(gguf_name, "blk.")
    if found is None:
        return None
    index, inner = found
    hf = next((t.hf for t in BLOCKS.get(arch, ()) if t.gguf == inner), None)
    return None if hf is None else f"model.layers.{index}.{hf}"


def to_gguf_name(hf_name: str, arch: str = "llama") -> str | None:
    """The inverse of `to_hf_name` (`arch` is the GGUF architecture)."""
    for t in _TOP:
        if t.hf is not None and t.hf == hf_name:
            return t.gguf
    found = _block(hf_name, "model.layers.")
    if found is None:
        return None
    index, inner = found
    gguf = next((t.gguf for t in BLOCKS.get(arch, ()) if t.hf == inner), None)
    return None if gguf is None else f"blk.{index}.{gguf}"


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF Q/K rows (or bias) -> llama.cpp's: within each head, interleave the two rotary halves."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape).copy())


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of `permute_qk`: llama.cpp's Q/K rows back to HF's."""
    return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape).copy())


def _qk_heads(gguf_name: str, config: Mapping[str, Any]) -> int | None:
    inner = gguf_name.split(".", 2)[-1] if gguf_name.startswith("blk.") else ""
    if inner.startswith("attn_q."):
        return config["num_attention_heads"]
    if inner.startswith("attn_k."):
        return config.get("num_key_value_heads") or config["num_attention_heads"]
    return None


def to_hf_tensor(arch: str, gguf_name: str, w: np.ndarray, config: Mapping[str, Any]) -> np.ndarray:
    """A dequantized GGUF tensor as HF holds it (Q/K rows unpermuted, Gemma norm offset removed)."""
    heads = _qk_heads(gguf_name, config) if arch in PERMUTED else None
    if heads is not None:
        return unpermute_qk(w, heads)
    if arch in NORM_OFFSET and gguf_name.endswith("norm.weight"):
        return w - np.asarray(NORM_OFFSET[arch], w.dtype)
    return w


def to_gguf_tensor(arch: str, gguf_name: str, w: np.ndarray, config: Mapping[str, Any]) -> np.ndarray:
    """The inverse of `to_hf_tensor`: an HF tensor as llama.cpp stores it under `gguf_name`."""
    heads = _qk_heads(gguf_name, config) if arch in PERMUTED else None
    if heads is not None:
        return permute_qk(w, heads)
    if arch in NORM_OFFSET and gguf_name.endswith("norm.weight"):
        return w + np.asarray(NORM_OFFSET[arch], w.dtype)
    return w


def _symbols(config: Mapping[str, Any]) -> dict[str, int]:
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    kv = config.get("num_key_value_heads") or heads
    return {
        "V": config["vocab_size"], "D": config["hidden_size"], "F": config["intermediate_size"],
        "F2": 2 * config["intermediate_size"], "Q": heads * head_dim, "K": kv * head_dim,
        "QKV": (heads + 2 * kv) * head_dim, "H": head_dim, "R": head_dim // 2,
    }


def expected_shapes(arch: str, config: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], bool]]:
    """GGUF tensor name -> (shape in NumPy order, required) for a config of GGUF `arch`."""
    sym = _symbols(config)
    out = {t.gguf: (tuple(sym[s] for s in t.shape), t.required) for t in _TOP}
    for i in range(config["num_hidden_layers"]):
        out |= {f"blk.{i}.{t.gguf}": (tuple(sym[s] for s in t.shape), t.required) for t in BLOCKS[arch]}
    return out


def check_tensors(arch: str, config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> Result[None, str]:
    """Every tensor known, of the shape the metadata implies, and none required missing."""
    expected = expected_shapes(arch, config)
    for name, shape in shapes.items():
        if name not in expected:
            return Failure(f"tensor {name!r} is not part of a GGUF {arch!r} model")
        want = expected[name][0]
        if tuple(shape) != want:
            return Failure(f"tensor {name!r} has shape {tuple(shape)} but the metadata implies {want}")
    missing = [n for n, (_, required) in expected.items() if required and n not in shapes]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        return Failure(f"missing tensor {missing[0]!r}{more}")
    return Success(None)


# ---- metadata <-> config.json ------------------------------------------------------------------

_REQUIRED = {
    "block_count": "num_hidden_layers", "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size", "attention.head_count": "num_attention_heads",
}
_GEMMA_ACT = "gelu_pytorch_tanh"


def _positive_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def _f32(x: float) -> float:
    """A GGUF float32 as the shortest decimal that is the same float32: 1e-05, not 9.9999997e-06."""
    return float(str(np.float32(x)))


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def config_from_metadata(
    metadata: Mapping[str, Any],
    tensors: Mapping[str, tuple[int, ...]] | None = None,
    rope_factors: np.ndarray | None = None,
) -> Result[dict, str]:
    """GGUF key/value metadata (+ tensor shapes, + `rope_freqs.weight`) -> a config.json dict."""
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        return Failure("no general.architecture in the metadata")
    return supported(arch).bind(lambda model_type: _config(arch, model_type, metadata, tensors or {}, rope_factors))


def _config(arch, model_type, metadata, tensors, rope_factors) -> Result[dict, str]:
    def key(name: str, default: Any = None) -> Any:
        return metadata.get(f"{arch}.{name}", default)

    for name in _REQUIRED:
        if not _positive_int(key(name)):
            return Failure(f"metadata {arch}.{name} is missing or not a positive integer (got {key(name)!r})")
    hidden, heads = key("embedding_length"), key("attention.head_count")
    kv = key("attention.head_count_kv", heads)
    if not (_positive_int(kv) and heads % kv == 0):
        return Failure(f"metadata {arch}.attention.head_count_kv={kv!r} does not divide head_count={heads}")
    rot = key("rope.dimension_count")
    head_dim = key("attention.key_length") or (rot if arch != "phi3" else None) or hidden // heads
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab = key("vocab_size") or (len(tokens) if isinstance(tokens, list | tuple) else None)
    vocab = vocab or (tensors.get("token_embd.weight") or (None,))[0]
    if not _positive_int(vocab):
        return Failure("no vocabulary size: no vocab_size, tokenizer.ggml.tokens or token_embd.weight")
    for name, value in (("attention.layer_norm_rms_epsilon", key("attention.layer_norm_rms_epsilon", 1e-5)),
                        ("rope.freq_base", key("rope.freq_base", 10000.0))):
        if not (_number(value) and value > 0):
            return Failure(f"metadata {arch}.{name} must be a positive number (got {value!r})")
    config: dict[str, Any] = {
        "architectures": [HF_CLASSES[model_type]], "model_type": model_type,
        **{hf: key(g) for g, hf in _REQUIRED.items()},
        "num_key_value_heads": kv, "head_dim": head_dim, "vocab_size": vocab,
        "max_position_embeddings": key("context_length", 2048),
        "rms_norm_eps": _f32(key("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _f32(key("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "hidden_act": _GEMMA_ACT if arch.startswith("gemma") else "silu",
        "torch_dtype": "float32",
    }
    for ours, theirs in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                         ("pad_token_id", "padding_token_id")):
        if _positive_int(metadata.get(f"tokenizer.ggml.{theirs}")) or metadata.get(f"tokenizer.ggml.{theirs}") == 0:
            config[ours] = metadata[f"tokenizer.ggml.{theirs}"]
    scaling = _rope_scaling(arch, key, head_dim, config["rope_theta"], rope_factors)
    if isinstance(scaling, str):
        return Failure(scaling)
    if scaling:
        config["rope_scaling"] = scaling
    config.update(_extras(arch, key, head_dim, rot, tensors))
    return Success(config)


def _extras(arch, key, head_dim, rot, tensors) -> dict[str, Any]:
    bias = "blk.0.attn_q.bias" in tensors
    if arch == "llama":
        return {"attention_bias": bias, "mlp_bias": "blk.0.ffn_gate.bias" in tensors}
    if arch == "qwen2":
        return {"use_sliding_window": False}
    if arch == "qwen3":
        return {"attention_bias": bias}
    if arch.startswith("gemma"):
        out = {"hidden_activation": _GEMMA_ACT, "query_pre_attn_scalar": head_dim,
               "sliding_window": key("attention.sliding_window", 4096)}
        if arch == "gemma2":
            return out | {"attn_logit_softcapping": key("attn_logit_softcapping"),
                          "final_logit_softcapping": key("final_logit_softcapping")}
        return out | {"rope_local_base_freq": 10000.0, "sliding_window_pattern": 6}
    if arch == "phi3":
        return {"partial_rotary_factor": (rot or head_dim) / head_dim,
                "sliding_window": key("attention.sliding_window")}
    return {}


def _rope_scaling(arch, key, head_dim, theta, rope_factors) -> dict | str | None:
    kind = key("rope.scaling.type")
    if kind in (None, "none"):
        if rope_factors is None or np.allclose(np.asarray(rope_factors, np.float64), 1.0):
            return None  # no tensor, or one that scales nothing
        # llama.cpp keeps no original context; only ratios to it shape the frequencies
        context = key("rope.scaling.original_context_length") or min(8192, key("context_length", 16384) // 2)
        return gguf_rope.llama3_from_factors(np.asarray(rope_factors), head_dim, theta, context).value_or(
            f"tensor 'rope_freqs.weight' is not a Llama 3 rope scaling for head_dim {head_dim}")
    if kind == "linear" and _number(key("rope.scaling.factor")):
        return {"rope_type": "linear", "factor": _f32(key("rope.scaling.factor"))}
    return f"metadata {arch}.rope.scaling.type={kind!r} is not supported (supported: none, linear, llama3)"


def metadata_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A config.json dict -> the GGUF key/value metadata a writer sets (tokens not included).

    Raises ValueError for a model_type llama.cpp has no architecture for here. A Llama 3 rope also
    needs the `rope_freqs.weight` tensor: `llama3_rope_factors(config)`.
    """
    model_type = config.get("model_type")
    if model_type not in GGUF_ARCHITECTURES:
        raise ValueError(f"model_type {model_type!r} has no GGUF architecture here "
                         f"(supported: {', '.join(GGUF_ARCHITECTURES)})")
    arch = GGUF_ARCHITECTURES[model_type]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    theta, scaling = gguf_rope.theta_and_scaling(config)
    meta: dict[str, Any] = {
        "general.architecture": arch,
        **{f"{arch}.{g}": config[hf] for g, hf in _REQUIRED.items()},
        f"{arch}.attention.head_count_kv": config.get("num_key_value_heads") or heads,
        f"{arch}.context_length": config.get("max_position_embeddings", 2048),
        f"{arch}.attention.layer_norm_rms_epsilon": float(config.get("rms_norm_eps", 1e-5)),
        f"{arch}.rope.freq_base": theta,
        f"{arch}.rope.dimension_count": int(head_dim * config.get("partial_rotary_factor", 1.0)),
        f"{arch}.attention.key_length": head_dim,
        f"{arch}.attention.value_length": head_dim,
        f"{arch}.vocab_size": config["vocab_size"],
    }
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        meta[f"{arch}.rope.scaling.type"] = "linear"
        meta[f"{arch}.rope.scaling.factor"] = float(scaling["factor"])
    elif scaling.get("rope_type", scaling.get("type")) == "llama3":
        meta[f"{arch}.rope.scaling.original_context_length"] = int(scaling["original_max_position_embeddings"])
    for ours, theirs in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                         ("pad_token_id", "padding_token_id")):
        if isinstance(config.get(ours), int):
            meta[f"tokenizer.ggml.{theirs}"] = config[ours]
    if arch.startswith("gemma") and config.get("sliding_window"):
        meta[f"{arch}.attention.sliding_window"] = config["sliding_window"]
    if arch == "gemma2":
        for name in ("attn_logit_softcapping", "final_logit_softcapping"):
            if config.get(name) is not None:
                meta[f"{arch}.{name}"] = float(config[name])
    if arch == "phi3" and config.get("sliding_window"):
        meta[f"{arch}.attention.sliding_window"] = config["sliding_window"]
    return meta
