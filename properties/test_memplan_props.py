"""Invariants of the memory planner: a plan fits its limit, keeps the effective batch, is monotone."""

from __future__ import annotations

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st
from returns.result import Failure, Success

from finetune.core import batching, memory, memplan
from finetune.core.config import Recipe
from finetune.core.modelinfo import ModelFacts

PROPS = settings(max_examples=60, deadline=None)

FACTS = ModelFacts(
    model_type="llama", hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
    intermediate_size=1536, vocab_size=49152, context_length=2048, tied_embeddings=True,
)

rows_st = st.lists(st.tuples(st.integers(2, 1024), st.floats(0.0, 1.0)), min_size=1, max_size=40)


def recipe(batch: int, accum: int, checkpoint: bool, bits: int) -> Recipe:
    return msgspec.convert({"model": {"quantize_bits": bits}, "train": {
        "batch_size": batch, "grad_accumulation": accum, "grad_checkpoint": checkpoint}}, Recipe)


def batches(rows: list[tuple[int, float]], batch: int) -> list[list[memplan.Row]]:
    shaped = [(n, max(1, int(n * share))) for n, share in rows]
    plan = batching.length_sorted([n for n, _ in shaped], batch)
    return [[shaped[i] for (i,) in b] for b in plan]


@PROPS
@given(rows_st, st.integers(1, 16), st.integers(1, 4), st.booleans(), st.sampled_from([0, 4]), st.floats(0.05, 8.0))
def test_a_plan_fits_its_limit_and_keeps_the_effective_batch(rows, batch, accum, checkpoint, bits, limit):
    r = recipe(batch, accum, checkpoint, bits)
    work = batches(rows, batch)
    match memplan.plan(FACTS, r, work, limit):
        case Success(p):
            assert p.estimate.total_gb <= limit
            assert p.effective_batch == batch * accum  # accumulation untouched: splits share each batch
            assert p.batch_size == batch and p.grad_accumulation == accum
            assert 1 <= p.micro_batch <= batch
            assert -(-max(len(b) for b in work) // p.splits) == p.micro_batch  # the largest share
            assert p.grad_checkpoint or not checkpoint  # a recipe's checkpointing is never turned off
        case Failure(message):
            weights = memory.weight_bytes(FACTS, bits, 64, "float32") / memory.GB
            assert ("below the model's" in message) == (limit <= weights)
            if limit > weights:  # nothing fits: not even one row with checkpointing
                needed = float(message.split("at least ")[1].split(" GB")[0])
                assert needed >= limit * 0.995  # printed to 3 significant digits


@PROPS
@given(rows_st, st.integers(1, 16), st.booleans(), st.floats(0.3, 6.0), st.floats(1.0, 4.0))
def test_more_memory_never_gives_a_smaller_micro_batch(rows, batch, checkpoint, limit, factor):
    r = recipe(batch, 1, checkpoint, 0)
    work = batches(rows, batch)
    small, large = memplan.plan(FACTS, r, work, limit), memplan.plan(FACTS, r, work, limit * factor)
    if isinstance(small, Success):
        assert isinstance(large, Success)
        a, b = small.unwrap(), large.unwrap()
        assert (b.grad_checkpoint, -b.micro_batch) <= (a.grad_checkpoint, -a.micro_batch)


@PROPS
@given(st.integers(1, 16), st.integers(32, 1024), st.booleans(), st.sampled_from([0, 4]))
def test_the_estimate_grows_with_batch_and_length_and_shrinks_with_checkpointing(batch, seq, checkpoint, bits):
    r = recipe(batch, 1, checkpoint, bits)
    e = memory.estimate(FACTS, r, seq)
    assert memory.estimate(FACTS, r, seq, batch_size=batch + 1).total_gb > e.total_gb
    assert memory.estimate(FACTS, r, seq + 32).total_gb > e.total_gb
    assert memory.estimate(FACTS, recipe(batch, 1, True, bits), seq).activations_gb <= memory.estimate(FACTS, recipe(batch, 1, False, bits), seq).activations_gb
    assert abs(e.total_gb - (e.weights_gb + e.lora_gb + e.activations_gb)) < 1e-12
