"""The torch engine's LM head and cross-entropy over chunks of positions (a fused linear loss).

`head_ce(head, h, targets, weights)` equals `Σ weights · F.cross_entropy(head(h).float(), targets)`
(within float32 summation order) without holding the `(N, vocab)` logits: each chunk's logits live
only while its loss and its gradient with respect to `h` are computed, in the forward pass; the
backward pass scales the stored `(N, D)` gradient. The head's matmul runs twice per step, as in
the plain path. A head whose weight trains (not LoRA's case) gets its gradient too. On the CPU the
zero-weight padding that ends the positions (`select` is padded to multiples of 64) skips the head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from finetune.core import headloss


class _HeadCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, targets, weights, chunk):  # noqa: D102
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and ctx.needs_input_grad[2] else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s, e in headloss.chunks(h.shape[0], chunk):
            hc, tc, wc = h[s:e], targets[s:e], weights[s:e]
            logits = F.linear(hc, weight, bias).float()  # (n, V)
            total += (F.cross_entropy(logits, tc, reduction="none") * wc).sum()
            if grad_h is None and grad_w is None and grad_b is None:
                continue
            g = logits.softmax(-1)  # d loss / d logits, in place from here
            g[torch.arange(e - s, device=g.device), tc] -= 1
            g.mul_(wc[:, None])
            if grad_b is not None:
                grad_b += g.sum(0)
            g = g.to(weight.dtype)
            if grad_h is not None:
                grad_h[s:e] = g @ weight
            if grad_w is not None:
                grad_w += (g.T @ hc.to(weight.dtype)).float()
            del logits, g  # before the next chunk's logits: one chunk alive at a time
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, out):  # noqa: D102
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        return (None if grad_h is None else grad_h * out.to(grad_h.dtype),
                None if grad_w is None else (grad_w * out).to(w_dtype),
                None if grad_b is None else (grad_b * out).to(b_dtype), None, None, None)


def head_ce(head: nn.Module, h: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, chunk: int = 0) -> torch.Tensor:
    """Σ weights · cross-entropy of `head(h)` at `targets`; `h` (N, D), `chunk` positions at a time
    (0: `core.headloss.chunk_rows` of the vocabulary). `head` is the model's output layer: a
    Linear is fused; any other module runs whole, as the plain path."""
    if h.device.type == "cpu":  # the padding (weight 0) that ends `select` is skipped where counting costs no sync
        last = weights.nonzero()
        n = int(last[-1, 0]) + 1 if last.numel() else 0
        h, targets, weights = h[:n], targets[:n], weights[:n]
    if not isinstance(head, nn.Linear):
        return (F.cross_entropy(head(h).float(), targets, reduction="none") * weights).sum()
    rows = chunk if chunk > 0 else headloss.chunk_rows(head.out_features)
    return _HeadCE.apply(h, head.weight, head.bias, targets, weights, rows)
