"""Properties of next-token sampling: greedy is argmax, top-p stays in the nucleus, keys reproduce."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from finetune.engines.mlx.sampling import nucleus, sample

LOGIT = st.floats(-12.0, 12.0, width=32, allow_nan=False)
VOCAB = st.integers(2, 48)
TEMP = st.floats(0.05, 3.0)
TOP_P = st.floats(0.01, 0.99)


def logits_1d(vocab=VOCAB):
    return vocab.flatmap(lambda v: arrays(np.float32, (v,), elements=LOGIT))


def logits_2d():
    shape = st.tuples(st.integers(1, 4), VOCAB)
    return shape.flatmap(lambda s: arrays(np.float32, s, elements=LOGIT))


def probs(logits: np.ndarray, temp: float) -> np.ndarray:
    z = logits.astype(np.float64) / temp
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@settings(max_examples=150, deadline=None)
@given(logits_2d(), st.integers(0, 2**31 - 1))
def test_greedy_is_argmax(logits, seed):
    got = sample(mx.array(logits), temp=0.0, top_p=0.5, key=mx.random.key(seed))
    assert got.tolist() == np.argmax(logits, axis=-1).tolist()
    one = sample(mx.array(logits[0]), temp=0.0, top_p=1.0, key=mx.random.key(seed))
    assert one.shape == () and one.item() == int(np.argmax(logits[0]))


@settings(max_examples=150, deadline=None)
@given(logits_1d(), TEMP, st.sampled_from([0.0, 1e-9, 1e-4]), st.integers(0, 2**31 - 1))
def test_tiny_top_p_picks_a_most_likely_token(logits, temp, top_p, seed):
    token = sample(mx.array(logits), temp=temp, top_p=top_p, key=mx.random.key(seed)).item()
    assert logits[token] == logits.max()  # ties at the top may pick any of them


@settings(max_examples=200, deadline=None)
@given(logits_2d(), TEMP, TOP_P, st.integers(0, 2**31 - 1))
def test_samples_come_from_the_nucleus(logits, temp, top_p, seed):
    tokens = sample(mx.array(logits), temp=temp, top_p=top_p, key=mx.random.key(seed)).tolist()
    p = probs(logits, temp)
    for row, t in enumerate(tokens):
        # t belongs to the smallest top-p set: the mass of strictly likelier tokens is below top_p.
        ahead = p[row][p[row] > p[row][t]].sum()
        assert ahead < top_p + 1e-5, (ahead, top_p)


@settings(max_examples=150, deadline=None)
@given(logits_2d(), TEMP, TOP_P)
def test_nucleus_is_the_smallest_set_reaching_top_p(logits, temp, top_p):
    kept = np.isfinite(np.array(nucleus(mx.array(logits) / temp, top_p)))
    p = probs(logits, temp)
    for row in range(logits.shape[0]):
        assert kept[row, np.argmax(logits[row])]
        assert p[row][kept[row]].sum() >= top_p - 1e-5  # reaches top_p
        # Minimal up to ties: dropping the least likely kept token (and its ties) falls short.
        last = p[row][kept[row]].min()
        assert p[row][kept[row] & (p[row] > last)].sum() < top_p + 1e-5


@settings(max_examples=100, deadline=None)
@given(logits_2d(), TEMP, st.floats(0.01, 1.0), st.integers(0, 2**31 - 1))
def test_same_key_same_sample(logits, temp, top_p, seed):
    x = mx.array(logits)
    a = sample(x, temp=temp, top_p=top_p, key=mx.random.key(seed))
    b = sample(x, temp=temp, top_p=top_p, key=mx.random.key(seed))
    assert a.tolist() == b.tolist()
    assert np.array_equal(np.array(x), logits)  # the input is untouched


def test_different_keys_explore_a_flat_distribution():
    """Guards the properties above: with temp > 0 the key really drives the choice."""
    x = mx.zeros((16,))
    seen = {sample(x, temp=1.0, top_p=1.0, key=mx.random.key(s)).item() for s in range(64)}
    assert len(seen) > 8
    kept = {sample(x - mx.arange(16), temp=1.0, top_p=0.7, key=mx.random.key(s)).item() for s in range(64)}
    assert kept == {0, 1}  # p ~ (0.63, 0.23, ...): 0.63 < 0.7 <= 0.86
