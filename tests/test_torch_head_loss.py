"""The torch engine's chunked head + loss skips the zero-weight padding that ends `select` without
changing the loss or any gradient, and keeps a half-precision head's gradients (beside
properties/test_chunked_loss_props.py, which covers float32 over random shapes)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finetune.engines.torch.loss import head_ce


def case(n: int, pad: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(n + pad)
    head = torch.nn.Linear(16, 300, bias=False).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(300, 16, generator=gen))
    h = torch.randn(n + pad, 16, generator=gen).to(dtype)
    targets = torch.randint(0, 300, (n + pad,), generator=gen)
    weights = torch.cat([(torch.rand(n, generator=gen) < 0.8).float(), torch.zeros(pad)])
    return head, h, targets, weights


def loss_and_grad(fn, head, h, targets, weights):
    x = h.clone().requires_grad_()
    loss = fn(head, x, targets, weights)
    loss.backward()
    return loss.detach(), x.grad


def test_trailing_padding_changes_neither_the_loss_nor_the_gradients():
    head, h, targets, weights = case(70, 58)
    loss, grad = loss_and_grad(lambda *a: head_ce(*a, chunk=64), head, h, targets, weights)
    unpadded = loss_and_grad(lambda *a: head_ce(*a, chunk=64), head, h[:70], targets[:70], weights[:70])
    assert torch.equal(loss, unpadded[0]) and torch.equal(grad[:70], unpadded[1])
    assert grad.shape == h.shape and not grad[70:].any()
    plain = loss_and_grad(lambda hd, x, t, w: (F.cross_entropy(hd(x).float(), t, reduction="none") * w).sum(), head, h, targets, weights)
    torch.testing.assert_close(loss, plain[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad, plain[1], rtol=1e-5, atol=1e-5)


def test_all_padding_gives_zero_loss_and_zero_gradient():
    head, h, targets, _ = case(0, 64)
    loss, grad = loss_and_grad(head_ce, head, h, targets, torch.zeros(64))
    assert float(loss) == 0.0 and grad.shape == h.shape and not grad.any()


def test_a_bfloat16_head_matches_the_plain_bfloat16_path():
    head, h, targets, weights = case(150, 42, torch.bfloat16)
    loss, grad = loss_and_grad(lambda *a: head_ce(*a, chunk=64), head, h, targets, weights)
    plain = loss_and_grad(lambda hd, x, t, w: (F.cross_entropy(hd(x).float(), t, reduction="none") * w).sum(), head, h, targets, weights)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, plain[0], rtol=1e-5, atol=1e-3)  # the same bf16 logits, float32 sums
    torch.testing.assert_close(grad.float(), plain[1].float(), rtol=2e-2, atol=2e-2)  # bf16 rounding of g and g @ W
