"""Invariants of the pure LoRA functions and of LoRA layers attached to real (tiny) models.

Exactness: with small-integer-valued float32 tensors and an integer scale every product and sum
stays far below 2**24, so float32 arithmetic is exact in any summation order and the identities
below must hold bit for bit, not just approximately.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx.utils import tree_flatten

from finetune.core import lora
from finetune.engines.mlx import lora as lora_modules
from finetune.engines.mlx.model import build

PROPS = settings(max_examples=40, deadline=None)
SMALL = settings(max_examples=12, deadline=None)


def int_matrix(draw, shape: tuple[int, ...], bound: int = 4) -> mx.array:
    n = int(np.prod(shape))
    values = draw(st.lists(st.integers(-bound, bound), min_size=n, max_size=n))
    return mx.array(np.array(values, np.float32).reshape(shape))


@st.composite
def lora_case(draw):
    """(x (batch, in), W (out, in), A (in, r), B (r, out), integer scale)."""
    fan_in, fan_out = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    rank, batch = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    x = int_matrix(draw, (batch, fan_in))
    w = int_matrix(draw, (fan_out, fan_in))
    a = int_matrix(draw, (fan_in, rank))
    b = int_matrix(draw, (rank, fan_out))
    scale = draw(st.integers(-3, 3))
    return x, w, a, b, scale


def same(a: mx.array, b: mx.array) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(np.array(a), np.array(b))


@PROPS
@given(lora_case())
def test_apply_equals_the_fused_forward_exactly(case):
    x, w, a, b, scale = case
    unfused = x @ w.T + lora.update(x, a, b, scale)  # what LoRALinear computes (no bias)
    fused = x @ lora.fuse(w, a, b, scale).T
    assert same(unfused, fused)
    # and both are the spec's y = x Wᵀ + scale · (x A) B, computed independently in numpy
    xn, wn, an, bn = (np.array(t, np.float64) for t in (x, w, a, b))
    expected = xn @ wn.T + scale * ((xn @ an) @ bn)
    assert np.array_equal(np.array(unfused, np.float64), expected)


@PROPS
@given(lora_case())
def test_fuse_adds_the_update_exactly(case):
    _, w, a, b, scale = case
    fused = lora.fuse(w, a, b, scale)
    assert fused.dtype == w.dtype
    # the fused weight really is W + scale · (A B)ᵀ in (out, in) layout
    expected = np.array(w) + scale * (np.array(a) @ np.array(b)).T
    assert np.array_equal(np.array(fused), expected)


@PROPS
@given(lora_case(), st.booleans(), st.floats(0.5, 64.0))
def test_zero_b_leaves_the_layer_unchanged(case, bias, scale):
    x, w, a, _, _ = case
    fan_out, fan_in = w.shape
    base = nn.Linear(fan_in, fan_out, bias=bias)
    base.weight = w
    if bias:
        base.bias = mx.arange(fan_out, dtype=mx.float32) - 1.0
    want = base(x)
    wrapped = lora_modules.LoRALinear(base, a, mx.zeros((a.shape[1], fan_out)), scale)
    assert same(wrapped(x), want)
    # a non-zero B changes it: the adapter is really on the forward path
    ones = mx.ones((a.shape[1], fan_out))
    wrapped.lora_b = ones
    if mx.any((x @ a) @ ones != 0).item():
        assert not same(wrapped(x), want)


@st.composite
def shapes_and_rank(draw):
    n = draw(st.integers(0, 6))
    paths = draw(st.lists(st.from_regex(r"[a-z]{1,4}(\.[0-9a-z]{1,3}){0,2}", fullmatch=True),
                          min_size=n, max_size=n, unique=True))
    shapes = {p: (draw(st.integers(1, 9)), draw(st.integers(1, 9))) for p in paths}
    return shapes, draw(st.integers(1, 8))


@PROPS
@given(shapes_and_rank())
def test_count_is_rank_times_in_plus_out(case):
    shapes, rank = case
    assert lora.count(shapes, rank) == sum(rank * (i + o) for i, o in shapes.values())
    params = lora.init(0, shapes, rank)
    assert lora.count(shapes, rank) == sum(v.size for v in params.values())


def llama_config(draw) -> dict:
    heads = draw(st.sampled_from([1, 2, 4]))
    return {
        "model_type": "llama",
        "hidden_size": 8 * heads,
        "intermediate_size": draw(st.integers(4, 24)),
        "num_hidden_layers": draw(st.integers(1, 3)),
        "num_attention_heads": heads,
        "num_key_value_heads": draw(st.sampled_from([d for d in (1, 2, 4) if heads % d == 0])),
        "vocab_size": draw(st.integers(8, 40)),
        "tie_word_embeddings": draw(st.booleans()),
    }


def gpt2_config(draw) -> dict:
    heads = draw(st.sampled_from([1, 2]))
    return {
        "model_type": "gpt2",
        "n_embd": 4 * heads * draw(st.integers(1, 3)),
        "n_head": heads,
        "n_layer": draw(st.integers(1, 3)),
        "n_positions": 16,
        "vocab_size": draw(st.integers(8, 40)),
        "n_inner": draw(st.sampled_from([None, 12])),
    }


@st.composite
def model_lora(draw):
    config = draw(st.sampled_from([llama_config, gpt2_config]))(draw)
    layers = config.get("num_hidden_layers", config.get("n_layer"))
    num_layers = draw(st.sampled_from([-1, *range(1, layers + 1)]))
    all_keys = draw(st.booleans())
    return config, num_layers, all_keys, draw(st.integers(1, 4))


@SMALL
@given(model_lora())
def test_count_equals_trainable_parameters_after_attach(case):
    config, num_layers, all_keys, rank = case
    model = build(config)
    block = lora_modules.block_linears(model)
    keys = lora.resolve_keys(["all-linear"] if all_keys else block[:1], block)
    layers = lora.select_layers(len(model.layers), num_layers)
    paths = lora.targets(lora_modules.layers_prefix(model), layers, keys)
    shapes = lora_modules.linear_shapes(model, paths)
    total_before = sum(v.size for _, v in tree_flatten(model.parameters()))
    params = {k: mx.array(v) for k, v in lora.init(1, shapes, rank).items()}
    lora_modules.attach(model, params, 2.0)
    trainable = dict(tree_flatten(model.trainable_parameters()))
    expected_n = len(layers) * len(keys)
    assert len(trainable) == 2 * expected_n
    assert sum(v.size for v in trainable.values()) == lora.count(shapes, rank)
    assert lora.count(shapes, rank) == sum(rank * (i + o) for i, o in shapes.values())
    # every trainable tensor is a LoRA factor, and the base parameters are all still there
    assert all(k.endswith((".lora_a", ".lora_b")) for k in trainable)
    total_after = sum(v.size for _, v in tree_flatten(model.parameters()))
    assert total_after == total_before + lora.count(shapes, rank)


@st.composite
def init_case(draw):
    shapes, rank = draw(shapes_and_rank())
    seeds = draw(st.lists(st.integers(0, 2**31 - 1), min_size=2, max_size=2, unique=True))
    return shapes, rank, seeds


@PROPS
@given(init_case())
def test_init_is_a_function_of_the_seed(case):
    shapes, rank, (s1, s2) = case
    shapes_copy = dict(shapes)
    one = lora.init(s1, shapes, rank)
    two = lora.init(s1, shapes, rank)
    other = lora.init(s2, shapes, rank)
    assert shapes == shapes_copy  # nothing mutated
    assert set(one) == {f"{p}.{leaf}" for p in shapes for leaf in ("lora_a", "lora_b")}
    assert set(one) == set(two) == set(other)
    for name in one:
        assert same(one[name], two[name]), name
    for path, (fan_in, fan_out) in shapes.items():
        a, b = np.array(one[f"{path}.lora_a"]), np.array(one[f"{path}.lora_b"])
        assert a.shape == (fan_in, rank) and b.shape == (rank, fan_out)
        assert one[f"{path}.lora_a"].dtype == np.float32 and b.dtype == np.float32
        bound = 1.0 / math.sqrt(fan_in)
        assert np.all(np.abs(a) <= bound)
        assert not np.any(b)
    # different seeds give different A factors (all together: tiny factors may collide by chance)
    if shapes:
        flat_one = np.concatenate([np.array(one[f"{p}.lora_a"]).ravel() for p in sorted(shapes)])
        flat_other = np.concatenate([np.array(other[f"{p}.lora_a"]).ravel() for p in sorted(shapes)])
        assert not np.array_equal(flat_one, flat_other)
