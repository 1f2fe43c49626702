"""Invariants of full fine-tuning's pure parts: which blocks train, which tensors a run may hold,
which recipes are refused, and the memory estimate's share for the trained weights."""

from __future__ import annotations

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st
from returns.result import Failure, Success

from finetune.core import full, memory
from finetune.core.config import Recipe
from finetune.core.modelinfo import ModelFacts

PROPS = settings(max_examples=80, deadline=None)
LEAVES = ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight", "self_attn.q_proj.bias")


def model_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (50, 8), "model.norm.weight": (8,), "lm_head.weight": (50, 8)}
    for i in range(layers):
        shapes |= {f"model.layers.{i}.{leaf}": (8, 8) if leaf.endswith("proj.weight") else (8,) for leaf in LEAVES}
    return shapes


class Shaped:
    def __init__(self, shape: tuple[int, ...]):
        self.shape = shape


@given(st.integers(1, 40), st.integers(-1, 60).filter(lambda n: n != 0))
@PROPS
def test_the_trained_blocks_are_the_last_ones(total, n):
    blocks = list(full.trained_blocks(total, n))
    assert len(blocks) == (total if n < 0 else min(n, total))
    assert blocks == list(range(total - len(blocks), total))


@given(st.integers(1, 6), st.data())
@PROPS
def test_any_set_of_block_weights_fits_and_nothing_else_does(layers, data):
    shapes = model_shapes(layers)
    blocks = sorted(k for k in shapes if k.startswith("model.layers."))
    chosen = data.draw(st.lists(st.sampled_from(blocks), min_size=1, unique=True))
    params = {k: Shaped(shapes[k]) for k in chosen}
    assert isinstance(full.check_weights(params, shapes, "model.layers", "f"), Success)
    outside = data.draw(st.sampled_from(["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                                         f"model.layers.{layers}.mlp.down_proj.weight"]))
    refused = full.check_weights({**params, outside: Shaped((8, 8))}, shapes, "model.layers", "f")
    assert isinstance(refused, Failure) and outside in refused.failure()
    bad = chosen[0]
    wrong = full.check_weights({**params, bad: Shaped((3,) + shapes[bad])}, shapes, "model.layers", "f")
    assert isinstance(wrong, Failure) and "has shape" in wrong.failure()


@given(st.sampled_from(["lora", "dora", "full"]), st.sampled_from([0, 4, 8]), st.booleans(), st.sampled_from([0.0, 0.1]))
@PROPS
def test_only_full_refuses_quantized_bases_keys_and_dropout(kind, bits, keys, dropout):
    r = msgspec.convert({"model": {"quantize_bits": bits}, "lora": {
        "fine_tune_type": kind, "dropout": dropout, "keys": ["self_attn.q_proj"] if keys else ["all-linear"]}}, Recipe)
    refused = isinstance(full.check_recipe(r), Failure)
    assert refused == (kind == "full" and (bits > 0 or keys or dropout > 0))


FACTS = ModelFacts(model_type="llama", hidden_size=64, num_layers=6, num_heads=4, num_kv_heads=2, head_dim=16,
                   intermediate_size=128, vocab_size=300, context_length=256, tied_embeddings=False)


@given(st.integers(-1, 6).filter(lambda n: n != 0), st.sampled_from(["float32", "bfloat16"]))
@PROPS
def test_a_full_estimate_grows_with_the_trained_blocks_and_counts_their_state_in_their_dtype(n, dtype):
    def recipe(layers: int) -> Recipe:
        return msgspec.convert({"lora": {"fine_tune_type": "full", "num_layers": layers}}, Recipe)

    e, every = (memory.estimate(FACTS, recipe(k), 64, dtype=dtype) for k in (n, -1))
    assert e.fine_tune_type == "full" and e.trainable == memory.full_parameters(FACTS, recipe(n))
    assert e.lora_gb * memory.GB == e.trainable * memory.BYTES[dtype] * memory.ADAPTER_COPIES  # gradient, m, v, update
    assert e.total_gb <= every.total_gb + 1e-12
