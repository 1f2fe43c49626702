"""Invariants of the quantization block (core/quantization): parse∘write round trips, the
canonical description is a fixed point, the stored-array checks accept exactly the layouts
`mx.quantize` produces, and nothing mutates its arguments."""

from __future__ import annotations

import copy

import mlx.core as mx
from hypothesis import given, settings
from hypothesis import strategies as st

from finetune.core import quantization
from finetune.core.quantization import MODES, Params

PROPS = settings(max_examples=60, deadline=None)


@st.composite
def params(draw) -> Params:
    mode = draw(st.sampled_from(sorted(MODES)))
    bits, groups, _ = MODES[mode]
    return Params(group_size=draw(st.sampled_from(groups)), bits=draw(st.sampled_from(bits)), mode=mode)


@st.composite
def layer_maps(draw) -> dict[str, Params | None]:
    paths = draw(st.lists(st.sampled_from([f"model.layers.{i}.{k}" for i in range(3) for k in ("q", "k", "down")]),
                          min_size=1, max_size=9, unique=True))
    return {p: draw(st.one_of(st.none(), params())) for p in paths}


@PROPS
@given(layer_maps())
def test_describe_round_trips_through_the_config_block(layers):
    before = copy.deepcopy(layers)
    quant = quantization.describe(layers)
    assert layers == before
    if quant is None:
        assert all(v is None for v in layers.values())
        return
    block = quant.as_config()
    again = quantization.parse_block(copy.deepcopy(block), "x").unwrap()
    assert again == quant and again.as_config() == block
    assert {p: again.params(p) for p in layers} == layers  # every layer's decision survives
    record = quantization.record(quant, on_load=True)
    assert quantization.parse_block(record, "x").unwrap() == quant  # the adapter's record too


@settings(max_examples=25, deadline=None)
@given(params(), st.sampled_from([1, 2, 4]))
def test_stored_plan_accepts_what_mx_quantize_writes_and_rejects_other_bits(p, groups):
    width = p.group_size * groups * 2
    w, scales, *_ = mx.quantize(mx.zeros((4, width)), group_size=p.group_size, bits=p.bits, mode=p.mode)
    quant = quantization.Quant(default=p)
    stored = {"lin": (tuple(w.shape), tuple(scales.shape))}
    assert quantization.stored_plan(quant, {"lin": width}, stored, "x").unwrap() == {"lin": p}
    other = [b for b in MODES[p.mode][0] if b != p.bits]
    for bits in other:
        wrong = quantization.Quant(default=Params(group_size=p.group_size, bits=bits, mode=p.mode))
        assert f"says {bits}-bit for lin" in quantization.stored_plan(wrong, {"lin": width}, stored, "x").failure()
