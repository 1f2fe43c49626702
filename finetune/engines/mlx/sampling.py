"""Next-token sampling for the MLX engine: greedy, temperature and top-p (nucleus), with an explicit
PRNG key (pure MLX; it lives beside generation because the core imports no engine)."""

from __future__ import annotations

import mlx.core as mx


def sample(logits: mx.array, *, temp: float, top_p: float, key: mx.array) -> mx.array:
    """Token ids from logits `(V,)` or `(B, V)`: `()` or `(B,)` uint32.

    temp 0 is greedy (argmax, the key unused). Otherwise the logits are divided by `temp` and, when
    `top_p < 1`, cut to the nucleus: the most probable tokens whose probability adds up to at least
    `top_p` (the top token always stays; tokens tied with the last one kept stay too). The key comes
    from `mx.random.key`/`mx.random.split`; the same key and logits give the same token.
    """
    assert temp >= 0.0 and 0.0 <= top_p <= 1.0, (temp, top_p)
    if temp == 0.0:
        return mx.argmax(logits, axis=-1)
    scaled = logits.astype(mx.float32) / temp  # HF's order: temperature, then top-p
    if top_p < 1.0:
        scaled = nucleus(scaled, top_p)
    return mx.random.categorical(scaled, axis=-1, key=key)


def nucleus(logits: mx.array, top_p: float) -> mx.array:
    """`logits` with every token outside the top-p nucleus set to -inf (same shape)."""
    order = mx.argsort(-logits, axis=-1)  # (..., V) most probable first
    ranked = mx.take_along_axis(logits, order, axis=-1)
    probs = mx.softmax(ranked, axis=-1)
    before = mx.cumsum(probs, axis=-1) - probs  # mass strictly ahead of each ranked token
    kept = (before < top_p).sum(axis=-1, keepdims=True)  # >= 1: `before` of the top token is 0
    kept = mx.maximum(kept, 1)  # top_p == 0 keeps the top token too
    cutoff = mx.take_along_axis(ranked, kept - 1, axis=-1)  # (..., 1) smallest kept logit
    # Compare logits, not probabilities: a token is dropped only if its logit is strictly lower.
    return mx.where(logits >= cutoff, logits, -mx.inf)
