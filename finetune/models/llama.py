"""Llama 2/3, Mistral and Qwen2: one pre-norm decoder with RoPE, GQA and SwiGLU, HF names.

Mistral adds a sliding window (applied in the mask); Qwen2 adds q/k/v biases and per-layer
sliding windows (`use_sliding_window`, `layer_types`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import mlx.core as mx
import mlx.nn as nn
from msgspec import Struct

from finetune.core import architectures
from finetune.models.attention import KVCache, attention_mask, cache_offset, packed_mask
from finetune.models.base import CausalLM

ROPE_TYPES = ("default", "linear", "llama3")


class LlamaArgs(Struct, frozen=True, kw_only=True):
    """The fields of a HF config this family uses, with HF's defaults resolved."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    layer_windows: tuple[int, ...] = ()  # per layer: sliding window size, 0 = full attention


def _rope_fields(config: Mapping) -> dict:
    """RoPE settings from `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling` (4.x)."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope type {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    fields = {
        "rope_theta": float(params.get("rope_theta", config.get("rope_theta", 10000.0))),
        "rope_type": kind,
        "rope_factor": float(params.get("factor", 1.0)),
    }
    if kind == "llama3":
        fields |= {
            "rope_low_freq_factor": float(params["low_freq_factor"]),
            "rope_high_freq_factor": float(params["high_freq_factor"]),
            "rope_original_max_position_embeddings": int(
                params["original_max_position_embeddings"]
            ),
        }
    return fields


def _layer_windows(config: Mapping) -> tuple[int, ...]:
    """Per-layer sliding window the way HF's Mistral/Qwen2 configs resolve it (0 = none)."""
    n = config["num_hidden_layers"]
    if config["model_type"] == "mistral":
        return (config.get("sliding_window", 4096) or 0,) * n
    if config["model_type"] == "qwen2" and config.get("use_sliding_window", False):
        window = config.get("sliding_window", 4096) or 0
        first = config.get("max_window_layers", 28)
        types = config.get("layer_types") or [
            "sliding_attention" if i >= first else "full_attention" for i in range(n)
        ]
        return tuple(window if t == "sliding_attention" else 0 for t in types)
    return (0,) * n


def args_from_config(config: Mapping) -> LlamaArgs:
    """LlamaArgs from a HF config.json mapping; ValueError for what we do not implement.

    Sizes and bias rules come from the architecture registry; RoPE and windows are this module's.
    """
    model_type = config["model_type"]
    d = architectures.REGISTRY[model_type].read(model_type, config)
    return LlamaArgs(
        model_type=model_type,
        vocab_size=d.vocab,
        hidden_size=d.hidden,
        intermediate_size=d.intermediate,
        num_hidden_layers=d.layers,
        num_attention_heads=d.heads,
        num_key_value_heads=d.kv_heads,
        head_dim=d.head_dim,
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        qkv_bias=d.qkv_bias,
        o_bias=d.o_bias,
        mlp_bias=d.mlp_bias,
        tie_word_embeddings=d.tied,
        layer_windows=_layer_windows(config),
        **_rope_fields(config),
    )


def rope_inv_freq(args: LlamaArgs) -> mx.array:
    """Inverse frequencies (head_dim / 2,) as HF computes them, scaling included."""
    dim = args.head_dim
    inv = 1.0 / (args.rope_theta ** (mx.arange(0, dim, 2, dtype=mx.float32) / dim))
    if args.rope_type == "linear":
        return inv / args.rope_factor
    if args.rope_type == "llama3":
        factor, low, high = args.rope_factor, args.rope_low_freq_factor, args.rope_high_freq_factor
        old = args.rope_original_max_position_embeddings
        wavelen = 2 * math.pi / inv
        scaled = mx.where(wavelen > old / low, inv / factor, inv)  # long waves slowed by factor
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        return mx.where(medium, smoothed, scaled)
    return inv


class Attention(nn.Module):
    """Grouped-query self-attention with rotary positions."""

    def __init__(self, args: LlamaArgs):
        super().__init__()
        d, hd = args.hidden_size, args.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = (
            args.num_attention_heads,
            args.num_key_value_heads,
            hd,
        )
        self.scale = hd**-0.5
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=args.qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=args.qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=args.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=args.o_bias)
        # Plain RoPE goes through the kernel's own `base` (as mlx-lm does, so adapters give the
        # same logits there); scaled variants pass explicit periods (`freqs` are 1 / inv_freq).
        self._base = args.rope_theta if args.rope_type == "default" else None
        self._periods = None if self._base else 1.0 / rope_inv_freq(args)

    def _rope(self, x: mx.array, offset: int, positions: mx.array | None = None) -> mx.array:
        if positions is not None:
            # Per-token positions (packed rows): one query per "row", each with its own offset,
            # so the fused kernel computes exactly what it computes for ordinary positions.
            b, h, t, hd = x.shape
            flat = x.transpose(0, 2, 1, 3).reshape(b * t, h, 1, hd)  # (B*T, H, 1, hd)
            out = mx.fast.rope(
                flat, self.head_dim, traditional=False, base=self._base, scale=1.0,
                offset=positions.reshape(-1), freqs=self._periods,
            )
            return out.reshape(b, t, h, hd).transpose(0, 2, 1, 3)  # (B, H, T, hd)
        return mx.fast.rope(
            x,
            self.head_dim,
            traditional=False,
            base=self._base,
            scale=1.0,
            offset=offset,
            freqs=self._periods,
        )

    def __call__(
        self, x: mx.array, mask, cache: KVCache | None = None, positions: mx.array | None = None
    ) -> mx.array:
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.n_heads, -1).transpose(0, 2, 1, 3)  # (B, H, T, hd)
        k = (
            self.k_proj(x).reshape(b, t, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        )  # (B, KV, T, hd)
        v = (
            self.v_proj(x).reshape(b, t, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        )  # (B, KV, T, hd)
        offset = cache.offset if cache is not None else 0
        q, k = self._rope(q, offset, positions), self._rope(k, offset, positions)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, KV, S, hd)
        out = mx.fast.scaled_dot_product_attention(
            q, k, v, scale=self.scale, mask=mask
        )  # (B, H, T, hd)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, t, -1))  # (B, T, D)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, args: LlamaArgs):
        super().__init__()
        d, f = args.hidden_size, args.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=args.mlp_bias)
        self.up_proj = nn.Linear(d, f, bias=args.mlp_bias)
        self.down_proj = nn.Linear(f, d, bias=args.mlp_bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(
        self, x: mx.array, mask, cache: KVCache | None = None, positions: mx.array | None = None
    ) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache, positions)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    """HF's `model.` submodule: embeddings, blocks, final norm."""

    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self._windows = args.layer_windows

    def __call__(
        self,
        ids: mx.array,
        mask=None,
        cache: list[KVCache] | None = None,
        segments: mx.array | None = None,
        positions: mx.array | None = None,
    ) -> mx.array:
        t, offset = ids.shape[1], cache_offset(cache)
        if segments is not None:  # packed rows: attention stays within each document
            masks = {w: packed_mask(segments, w) for w in set(self._windows)}
        else:
            masks = {w: attention_mask(t, offset, mask, w) for w in set(self._windows)}
        h = self.embed_tokens(ids)  # (B, T, D)
        for i, layer in enumerate(self.layers):
            h = layer(h, masks[self._windows[i]], cache[i] if cache else None, positions)
        return self.norm(h)


class Model(CausalLM):
    """Causal LM: `model(ids (B, T), mask (B, S) of 1/0 or None, cache) -> logits (B, T, vocab)`."""

    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.args = args
        self.model = LlamaModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    @property
    def backbone(self) -> nn.Module:
        return self.model

    @property
    def embedding(self) -> nn.Embedding:
        return self.model.embed_tokens

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.layers
