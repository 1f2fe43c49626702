"""Attention masks (causal, padding, sliding window) and the KV cache the architectures share."""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    """One layer's keys and values, grown by concatenation along the time axis."""

    def __init__(self) -> None:
        self.keys: mx.array | None = None  # (B, n_kv_heads, S, head_dim)
        self.values: mx.array | None = None

    @property
    def offset(self) -> int:
        """Number of positions already cached."""
        return 0 if self.keys is None else self.keys.shape[2]

    def update(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append this step's keys/values; return everything cached so far."""
        if self.keys is not None:
            keys = mx.concatenate([self.keys, keys], axis=2)  # (B, n_kv, S, hd)
            values = mx.concatenate([self.values, values], axis=2)
        self.keys, self.values = keys, values
        return keys, values


def cache_offset(cache: list[KVCache] | None) -> int:
    """Position of the first new token: how many the cache already holds."""
    return cache[0].offset if cache else 0


def attention_mask(
    length: int, offset: int, padding: mx.array | None = None, window: int = 0
) -> mx.array | str | None:
    """Mask for `length` new queries after `offset` cached keys.

    padding: (B, offset + length) of 1 (token) / 0 (pad), HF's `attention_mask` convention.
    window: sliding-window size (a query sees the `window` most recent keys, itself included); 0 = none.
    Returns "causal", None (a single query, nothing to mask) or a boolean (B|1, 1, T, S) array.
    """
    total = offset + length
    if padding is not None and padding.shape[-1] != total:
        raise ValueError(f"attention mask covers {padding.shape[-1]} positions, expected {total}")
    if padding is None and (window == 0 or total <= window):
        return "causal" if length > 1 else None
    q = mx.arange(offset, total)[:, None]  # (T, 1) absolute query positions
    k = mx.arange(total)[None]  # (1, S)
    allowed = k <= q  # (T, S)
    if window:
        allowed = allowed & (q - k < window)
    if padding is not None:
        keep = padding.astype(mx.bool_)[:, None, None, :]  # (B, 1, 1, S)
        # A pad query still sees itself: no fully masked row, which some kernels turn into NaN.
        allowed = allowed & (keep | (k == q))  # (B, 1, T, S)
    return allowed


def packed_mask(segments: mx.array, window: int = 0) -> mx.array:
    """Per-document causal mask for packed rows: a query sees earlier keys of its own segment.

    segments: (B, T) document ids, one per token (padding gets its own id).
    Returns a boolean (B, 1, T, T) array.
    """
    t = segments.shape[1]
    q = mx.arange(t)[:, None]  # (T, 1)
    k = mx.arange(t)[None]  # (1, T)
    allowed = k <= q
    if window:
        allowed = allowed & (q - k < window)
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    return (allowed & same)[:, None]  # (B, 1, T, T)


def softcapped_attention(
    q: mx.array, k: mx.array, v: mx.array, scale: float, mask, cap: float
) -> mx.array:
    """Attention with `cap · tanh(scores / cap)` before the mask (Gemma 2), as HF's eager path.

    q: (B, H, T, hd); k, v: (B, KV, S, hd); mask: "causal", None or a boolean (…, T, S) array.
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = mx.repeat(k, groups, axis=1), mx.repeat(v, groups, axis=1)  # (B, H, S, hd)
    scores = (q @ k.swapaxes(-1, -2)) * scale  # (B, H, T, S)
    scores = mx.tanh(scores / cap) * cap
    if isinstance(mask, str):
        t, s = scores.shape[-2:]
        mask = mx.arange(s - t, s)[:, None] >= mx.arange(s)[None]  # (T, S)
    if mask is not None:
        scores = mx.where(mask, scores, mx.array(-mx.inf, scores.dtype))
    weights = mx.softmax(scores.astype(mx.float32), axis=-1).astype(q.dtype)
    return weights @ v  # (B, H, T, hd)
