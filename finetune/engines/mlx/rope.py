"""Rotary positions for one layer, every variant HF implements, through MLX's fused kernel."""

from __future__ import annotations

import mlx.core as mx

from finetune.core import arch_rope
from finetune.core.arch_rope import Rope


class RoPE:
    """Rotates the first `dims` features of each head (HF's non-interleaved convention).

    Plain RoPE goes through the kernel's own `base` (as mlx-lm does, so adapters give the same
    logits there); scaled variants pass explicit periods (`freqs` are 1 / inv_freq). Dynamic and
    longrope periods depend on the length of the forward, as in HF (packed rows: dynamic reads
    the row's length, longrope the longest document's).
    """

    def __init__(self, r: Rope, head_dim: int):
        self.r, self.dims = r, r.dims or head_dim
        self._periods: dict[bool | int, mx.array | None] = {}

    def periods(self, length: int) -> mx.array | None:
        if self.r.kind == "dynamic":
            key: bool | int = max(length, self.r.max_positions)
        else:
            key = self.r.kind == "longrope" and length > self.r.original_max
        if key not in self._periods:
            inv = arch_rope.inv_freq(self.r, length)
            self._periods[key] = None if inv is None else 1.0 / mx.array(inv, dtype=mx.float32)
        return self._periods[key]

    def __call__(self, x: mx.array, offset: int, positions: mx.array | None = None) -> mx.array:
        """x: (B, H, T, hd); `positions` (B, T) for packed rows, else `offset` + 0..T-1."""
        if self.r.kind == "none":
            return x
        b, h, t, hd = x.shape
        periods = self.periods(offset + t)
        if positions is not None and self.r.kind == "longrope":
            # HF picks the factors by the longest position (packed rows: the longest document).
            longest = mx.max(positions) + 1
            periods = mx.where(longest > self.r.original_max, self.periods(self.r.original_max + 1),
                               self.periods(self.r.original_max))
        base = self.r.theta if periods is None else None
        if positions is not None:
            # Per-token positions (packed rows): one query per "row", each with its own offset,
            # so the fused kernel computes exactly what it computes for ordinary positions.
            flat = x.transpose(0, 2, 1, 3).reshape(b * t, h, 1, hd)  # (B*T, H, 1, hd)
            out = mx.fast.rope(flat, self.dims, traditional=False, base=base, scale=1.0,
                               offset=positions.reshape(-1), freqs=periods)
            out = out.reshape(b, t, h, hd).transpose(0, 2, 1, 3)  # (B, H, T, hd)
        else:
            out = mx.fast.rope(x, self.dims, traditional=False, base=base, scale=1.0, offset=offset,
                               freqs=periods)
        a = self.r.attention_factor
        if a == 1.0:
            return out
        if self.dims == hd:  # yarn/longrope scale cos and sin: the rotated part only
            return out * a
        return mx.concatenate([out[..., : self.dims] * a, out[..., self.dims :]], axis=-1)
