"""The MLX engine's LM head and cross-entropy over chunks of positions.

`head_ce(head, h, targets, weights)` equals `Σ weights · cross_entropy(head(h).astype(float32),
targets)` (within float32 summation order) without holding the `(N, vocab)` logits: each chunk's
logits live only while its loss and its gradient with respect to `h` are computed, in the forward
pass. The backward pass then only scales that stored `(N, D)` gradient, so the head's matmul runs
twice per step (forward, input gradient) as in the plain path, and never a third time. The head's
own weights get no gradient (LoRA freezes them). `grad=False` (evaluation) skips the gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

from finetune.core import headloss

Head = Callable[[mx.array], mx.array]  # (n, D) -> (n, vocab)


def _chunk(head: Head, hc: mx.array, tc: mx.array, wc: mx.array, grad: bool) -> tuple[mx.array, mx.array | None]:
    """(Σ weighted cross-entropy of one chunk, its gradient with respect to `hc` or None)."""
    raw = head(hc)  # (n, V) in the head's dtype
    logits = raw.astype(mx.float32)
    lse = mx.logsumexp(logits, axis=-1)  # (n,)
    picked = mx.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]
    loss = ((lse - picked) * wc).sum()
    if not grad:
        return loss, None
    g = mx.exp(logits - lse[:, None])  # softmax
    g = (g - (mx.arange(g.shape[-1])[None] == tc[:, None])) * wc[:, None]  # d loss / d logits
    _, (gh,) = mx.vjp(head, [hc], [g.astype(raw.dtype)])
    return loss, gh


def head_ce(head: Head, h: mx.array, targets: mx.array, weights: mx.array, chunk: int = 0,
            grad: bool = True) -> mx.array:
    """Σ weights · cross-entropy of `head(h)` at `targets`; `h` (N, D), `chunk` positions at a time
    (0: `core.headloss.chunk_rows` of the head's vocabulary)."""
    if chunk <= 0:
        chunk = headloss.chunk_rows(head(h[:1]).shape[-1])  # the shape alone: never evaluated
    pieces = headloss.chunks(h.shape[0], chunk)
    if not grad:
        return sum((_chunk(head, h[s:e], targets[s:e], weights[s:e], False)[0] for s, e in pieces), mx.array(0.0))

    @mx.custom_function
    def fused(h, targets, weights):
        losses, grads = [], []
        for s, e in pieces:
            loss, gh = _chunk(head, h[s:e], targets[s:e], weights[s:e], True)
            losses.append(loss)
            grads.append(gh)
        total = sum(losses[1:], losses[0]) if losses else mx.array(0.0)
        return total, (mx.concatenate(grads) if grads else mx.zeros_like(h))

    @fused.vjp
    def fused_vjp(primals, cotangents, outputs):
        h, targets, weights = primals
        return (outputs[1] * cotangents[0].astype(h.dtype), mx.zeros_like(targets), mx.zeros_like(weights))

    return fused(h, targets, weights)[0]
