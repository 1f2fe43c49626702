"""Rotary position settings of one layer, read from either config style (pure).

transformers 5 writes `rope_parameters` (nested by layer type where layers differ, e.g. gemma3's
`full_attention`/`sliding_attention`); hub checkpoints carry top-level `rope_theta`,
`rope_scaling` (`type` or `rope_type`), `partial_rotary_factor`, gemma3's `rope_local_base_freq`
and GPT-NeoX's `rotary_emb_base`/`rotary_pct`. `Rope` is what the MLX module needs, resolved.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from msgspec import Struct

KINDS = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")


class Rope(Struct, frozen=True, kw_only=True):
    """One layer's rotary embedding; kind "none" for a layer without positions (SmolLM3)."""

    kind: str = "default"
    theta: float = 10000.0
    dims: int = 0  # rotated features of a head (partial rotary: fewer than head_dim)
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0
    original_max: int = 0  # pre-training context (llama3, yarn, longrope)
    max_positions: int = 0  # config's max_position_embeddings (dynamic)
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float = 1.0  # yarn/longrope: cos and sin scaled by it
    short_factor: tuple[float, ...] = ()  # longrope
    long_factor: tuple[float, ...] = ()


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def parameters(c: Mapping[str, Any], layer_type: str, theta: float) -> dict[str, Any]:
    """The rope dict that applies to `layer_type` layers, `rope_theta` filled in."""
    raw = c.get("rope_parameters") or c.get("rope_scaling") or {}
    nested = isinstance(raw.get(layer_type), Mapping)
    p = dict(raw[layer_type] if nested else raw)
    p.setdefault("rope_theta", c.get("rope_theta", theta))
    return p


def read(c: Mapping[str, Any], p: Mapping[str, Any], head_dim: int, partial: float) -> Rope:
    """A `Rope` from a layer's rope dict `p`; ValueError for a kind we do not implement."""
    kind = p.get("rope_type", p.get("type", "default"))
    kind = "longrope" if kind == "su" else kind  # Phi-3 checkpoints' old spelling
    if kind not in KINDS:
        raise ValueError(f"rope type {kind!r} is not supported; supported: {', '.join(KINDS)}")
    partial = float(p.get("partial_rotary_factor", c.get("partial_rotary_factor", partial)))
    dims = int(head_dim * partial)
    max_positions = int(c.get("max_position_embeddings", 2048))
    original = int(c.get("original_max_position_embeddings") or p.get("original_max_position_embeddings")
                   or max_positions)
    factor = p.get("factor")
    common = dict(kind=kind, theta=float(p["rope_theta"]), dims=dims, max_positions=max_positions,
                  original_max=original)
    if kind in ("default",):
        return Rope(**common)
    if kind in ("linear", "dynamic"):
        return Rope(**common, factor=float(factor))
    if kind == "llama3":
        return Rope(**common, factor=float(factor), low_freq_factor=float(p["low_freq_factor"]),
                    high_freq_factor=float(p["high_freq_factor"]))
    factor = float(factor) if factor is not None else max_positions / original
    attention = p.get("attention_factor")
    if kind == "yarn":
        if attention is None:
            m, m_all = p.get("mscale"), p.get("mscale_all_dim")
            attention = (_yarn_mscale(factor, m) / _yarn_mscale(factor, m_all) if m and m_all
                         else _yarn_mscale(factor))
        return Rope(**common, factor=factor, attention_factor=float(attention),
                    beta_fast=float(p.get("beta_fast") or 32), beta_slow=float(p.get("beta_slow") or 1),
                    truncate=bool(p.get("truncate", True)))
    if attention is None:  # longrope
        attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    if p.get("short_factor") is None or p.get("long_factor") is None:  # transformers refuses it too
        raise ValueError("rope type 'longrope' needs short_factor and long_factor (Phi-3 reads "
                         "'su' and 'yarn' as longrope); add both to rope_scaling")
    short, long = tuple(map(float, p["short_factor"])), tuple(map(float, p["long_factor"]))
    if len(short) != dims // 2 or len(long) != dims // 2:
        raise ValueError(f"longrope factors must have {dims // 2} entries (rotary dims / 2)")
    return Rope(**common, factor=factor, attention_factor=float(attention), short_factor=short,
                long_factor=long)


def inv_freq(r: Rope, length: int) -> list[float] | None:
    """HF's inverse frequencies (dims/2) for a forward over `length` positions; None: plain RoPE."""
    d, base = r.dims, r.theta
    if r.kind == "default":
        return None
    if r.kind == "dynamic":
        if length <= r.max_positions:
            return None
        base *= (r.factor * length / r.max_positions - (r.factor - 1)) ** (d / (d - 2))
    freqs = [base ** (-(i / d)) for i in range(0, d, 2)]  # HF: 1 / base^(2i/d)
    if r.kind == "dynamic":
        return freqs
    if r.kind == "linear":
        return [f / r.factor for f in freqs]
    if r.kind == "llama3":
        old, low, high = r.original_max, r.low_freq_factor, r.high_freq_factor
        out = []
        for f in freqs:
            wave = 2 * math.pi / f
            scaled = f / r.factor if wave > old / low else f
            if old / high <= wave <= old / low:
                smooth = (old / wave - low) / (high - low)
                scaled = (1 - smooth) * scaled / r.factor + smooth * scaled
            out.append(scaled)
        return out
    if r.kind == "yarn":
        def dim_at(rot: float) -> float:
            return d * math.log(r.original_max / (rot * 2 * math.pi)) / (2 * math.log(base))
        lo, hi = dim_at(r.beta_fast), dim_at(r.beta_slow)
        if r.truncate:
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, d - 1)
        hi = hi + 0.001 if lo == hi else hi
        out = []
        for i, f in enumerate(freqs):
            extra = 1 - min(max((i - lo) / (hi - lo), 0.0), 1.0)
            out.append(f / r.factor * (1 - extra) + f * extra)
        return out
    ext = r.long_factor if length > r.original_max else r.short_factor  # longrope
    return [f / e for f, e in zip(freqs, ext, strict=True)]
