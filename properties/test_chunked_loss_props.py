"""The chunked head + cross-entropy of both engines equals the plain one (the whole `(N, vocab)`
logits, then cross-entropy) in value and gradients, over random shapes, masks and chunk sizes.

Only the order of float32 sums differs (per chunk, then across chunks), so values agree to
float32 rounding of the sum, and each position's gradient (computed from the same logits) to
rounding of its own matmul.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from finetune.core import headloss
from finetune.engines.mlx.loss import head_ce as mlx_head_ce
from finetune.engines.torch.loss import head_ce as torch_head_ce

PROPS = settings(max_examples=30, deadline=None)


@st.composite
def case(draw):
    """(h (N, D), head weight (V, D), targets (N,), weights (N,) of 0/1, chunk) as numpy."""
    n, d, v = draw(st.integers(1, 200)), draw(st.integers(1, 24)), draw(st.integers(2, 600))
    chunk = draw(st.one_of(st.integers(1, 220), st.just(0)))  # 0: the default rule
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    mask = rng.random(n) < draw(st.sampled_from([0.0, 0.3, 1.0]))
    h = rng.normal(size=(n, d)).astype(np.float32) * draw(st.sampled_from([0.1, 1.0, 8.0]))
    w = rng.normal(size=(v, d)).astype(np.float32)
    return h, w, rng.integers(0, v, n), mask.astype(np.float32), chunk


def close(a, b, scale) -> None:
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=2e-5, atol=2e-5 * scale)


@PROPS
@given(case(), st.booleans())
def test_mlx_chunked_loss_and_gradient_equal_the_plain_ones(c, tied):
    h, w, t, m, chunk = c
    if tied:  # a tied head: the token embedding as a linear layer
        embedding = nn.Embedding(w.shape[0], w.shape[1])
        embedding.weight = mx.array(w)
        head = embedding.as_linear
    else:
        head = nn.Linear(w.shape[1], w.shape[0], bias=False)
        head.weight = mx.array(w)
    targets, weights = mx.array(t.astype(np.int32)), mx.array(m)

    def plain(x):
        return (nn.losses.cross_entropy(head(x).astype(mx.float32), targets, reduction="none") * weights).sum()

    def chunked(x):
        return mlx_head_ce(head, x, targets, weights, chunk)

    (a, ga), (b, gb) = mx.value_and_grad(plain)(mx.array(h)), mx.value_and_grad(chunked)(mx.array(h))
    scale = float(np.abs(np.array(nn.losses.cross_entropy(head(mx.array(h)), targets, reduction="none"))).sum()) + 1
    close(b, a, scale)
    close(mlx_head_ce(head, mx.array(h), targets, weights, chunk, grad=False), a, scale)
    close(gb, ga, 1.0)
    assert gb.dtype == ga.dtype and gb.shape == ga.shape


@PROPS
@given(case(), st.booleans())
def test_torch_chunked_loss_and_gradients_equal_the_plain_ones(c, bias):
    h, w, t, m, chunk = c
    head = torch.nn.Linear(w.shape[1], w.shape[0], bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(w))
    targets, weights = torch.from_numpy(t), torch.from_numpy(m)
    grads = []
    for fn in (lambda x: (F.cross_entropy(head(x).float(), targets, reduction="none") * weights).sum(),
               lambda x: torch_head_ce(head, x, targets, weights, chunk)):
        x = torch.from_numpy(h).requires_grad_()
        head.zero_grad()
        loss = fn(x)
        loss.backward()
        grads.append([loss.detach(), x.grad, head.weight.grad.clone()] + ([head.bias.grad.clone()] if bias else []))
    (a, *ga), (b, *gb) = grads
    with torch.no_grad():
        scale = float(F.cross_entropy(head(torch.from_numpy(h)), targets, reduction="none").abs().sum()) + 1
        close(b, a, scale)
        close(torch_head_ce(head, torch.from_numpy(h), targets, weights, chunk), a, scale)
    for x, y in zip(gb, ga, strict=True):
        close(x, y, float(h.shape[0]) * (1 + np.abs(h).max()))  # the head's gradient sums over N positions


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 300_000), st.integers(0, 5000))
def test_chunks_cover_every_position_once_in_aligned_pieces(vocab, n):
    rows = headloss.chunk_rows(vocab)
    assert rows % headloss.ALIGN == 0 and rows >= headloss.ALIGN
    assert rows * vocab <= max(headloss.CHUNK_ELEMENTS, headloss.ALIGN * vocab)
    pieces = headloss.chunks(n, rows)
    assert [i for s, e in pieces for i in range(s, e)] == list(range(n))
    assert all(0 < e - s <= rows for s, e in pieces)
