"""Invariants of batch plans (length-sorted and packed), batch arrays and the epoch walk."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from finetune.core import batching
from finetune.core.tokenize import Tokens

PROPS = settings(max_examples=60, deadline=None)

lengths_st = st.lists(st.integers(1, 300), min_size=1, max_size=60)


def flat(plan) -> list[int]:
    return [i for batch in plan for row in batch for i in row]


@PROPS
@given(lengths_st, st.integers(1, 9))
def test_length_sorted_batches_are_sorted_and_cover_every_example_once(lengths, batch_size):
    plan = batching.length_sorted(lengths, batch_size)
    assert sorted(flat(plan)) == list(range(len(lengths)))
    assert all(len(row) == 1 for batch in plan for row in batch)
    assert all(1 <= len(batch) <= batch_size for batch in plan)
    assert all(len(batch) == batch_size for batch in plan[:-1])  # only the last may be short
    seen = [lengths[i] for i in flat(plan)]
    assert seen == sorted(seen)  # within and across batches
    assert len(plan) == -(-len(lengths) // batch_size)


@PROPS
@given(lengths_st, st.integers(1, 9), st.integers(8, 400))
def test_packed_rows_fit_and_cover_every_example_once(lengths, batch_size, capacity):
    plan = batching.packed(lengths, batch_size, capacity)
    assert sorted(flat(plan)) == list(range(len(lengths)))
    assert all(1 <= len(batch) <= batch_size for batch in plan)
    assert all(len(batch) == batch_size for batch in plan[:-1])
    for batch in plan:
        for row in batch:
            assert row
            assert sum(min(lengths[i], capacity) for i in row) <= capacity
    # first-fit: no two rows could have been merged when the second was opened, so there are at
    # most twice as many rows as the perfect packing needs (plus one)
    rows = sum(len(b) for b in plan)
    need = -(-sum(min(n, capacity) for n in lengths) // capacity)
    assert rows <= 2 * need + 1


@st.composite
def tokens_st(draw, min_len: int = 2, max_len: int = 70):
    """A valid `Tokens`: ids >= 1 (0 is make_batch's padding id), mask[0] = 0 like `tokenize`."""
    n = draw(st.integers(min_len, max_len))
    ids = draw(st.lists(st.integers(1, 999), min_size=n, max_size=n))
    mask = [0] + draw(st.lists(st.integers(0, 1), min_size=n - 1, max_size=n - 1))
    return Tokens(tuple(ids), tuple(mask))


@st.composite
def batch_rows(draw):
    packed = draw(st.booleans())
    n_rows = draw(st.integers(1, 5))
    per_row = st.integers(1, 3) if packed else st.just(1)
    rows = [draw(st.lists(tokens_st(), min_size=draw(per_row), max_size=3 if packed else 1))
            for _ in range(n_rows)]
    max_length = draw(st.integers(8, 160))
    return rows, max_length


def reference(rows, max_length):
    """Spec, restated: each row's documents concatenated and cut at max_length; target
    position t of row r (input index r*W + t) is supervised when the token at t+1 has mask 1
    and lies in the same document."""
    kept = []
    for row in rows:
        ids, mask, doc = [], [], []
        for d, tok in enumerate(row):
            room = max_length - len(ids)
            take = max(0, min(len(tok.ids), room))
            ids += tok.ids[:take]
            mask += tok.mask[:take]
            doc += [d] * take
        kept.append((ids, mask, doc))
    return kept


@PROPS
@given(batch_rows(), st.sampled_from([1, 16, 64]))
def test_make_batch_selects_exactly_the_supervised_targets(case, select_multiple):
    rows, max_length = case
    b = batching.make_batch(rows, max_length, select_multiple)
    kept = reference(rows, max_length)
    longest = max(len(ids) for ids, _, _ in kept)
    n_rows, width = b.inputs.shape
    assert n_rows == len(rows)
    assert width % 32 == 0 and width >= longest - 1 and width < longest - 1 + 32
    assert b.inputs.dtype == np.int32
    expected_select, expected_targets = [], []
    for r, (ids, mask, doc) in enumerate(kept):
        shown = min(len(ids), width)  # the last token is an input too unless the row is full
        assert list(b.inputs[r, :shown]) == ids[:shown]
        assert not b.inputs[r, shown:].any()  # padding
        for t in range(len(ids) - 1):
            if mask[t + 1] == 1:
                assert doc[t + 1] == doc[t]  # a target never crosses a document boundary
                expected_select.append(r * width + t)
                expected_targets.append(ids[t + 1])
    count = len(expected_select)
    assert b.supervised == count
    # weights count = the sum of the kept masks (no first token of a document is a target)
    assert count == sum(sum(mask) for _, mask, _ in kept)
    assert b.weights.sum() == count and set(np.unique(b.weights)) <= {0.0, 1.0}
    assert len(b.select) == len(b.targets) == len(b.weights)
    assert len(b.select) % select_multiple == 0 and len(b.select) >= count
    live = b.weights == 1.0
    assert np.all(live[:count]) and not np.any(live[count:])
    assert list(b.select[:count]) == expected_select
    assert list(b.targets[:count]) == expected_targets
    # targets are really the next token: input at select+1 (or the cut-off last token)
    for s, tgt in zip(b.select[:count], b.targets[:count], strict=True):
        r, t = divmod(int(s), width)
        assert tgt == kept[r][0][t + 1]
        assert t < len(kept[r][0]) - 1  # never a padding position
    assert b.tokens == sum(len(ids) - 1 for ids, _, _ in kept)
    assert 0 < b.padding_efficiency <= 1
    if any(len(row) > 1 for row in rows):
        assert b.segments is not None and b.positions is not None
        for r, (ids, _, doc) in enumerate(kept):
            n = min(len(ids), width)
            assert list(b.segments[r, :n]) == doc[:n]
            assert np.all(b.segments[r, n:] == -1)
            starts = {d: doc.index(d) for d in set(doc)}
            assert list(b.positions[r, :n]) == [t - starts[doc[t]] for t in range(n)]
    else:
        assert b.segments is None and b.positions is None


@st.composite
def unpacked_any_mask(draw):
    n_rows = draw(st.integers(1, 4))
    rows = []
    for _ in range(n_rows):
        n = draw(st.integers(2, 50))
        ids = draw(st.lists(st.integers(1, 99), min_size=n, max_size=n))
        mask = draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
        rows.append([Tokens(tuple(ids), tuple(mask))])
    return rows, draw(st.integers(8, 60))


@PROPS
@given(unpacked_any_mask())
def test_a_rows_first_token_is_never_a_target_whatever_its_mask(case):
    rows, max_length = case
    b = batching.make_batch(rows, max_length)
    assert b.supervised == sum(sum(row[0].mask[1:max_length]) for row in rows)


@PROPS
@given(st.integers(1, 200), st.integers(0, 2**32 - 1), st.integers(0, 50))
def test_epoch_order_is_a_reproducible_permutation(n, seed, epoch):
    order = batching.epoch_order(n, seed, epoch)
    assert sorted(order.tolist()) == list(range(n))
    assert np.array_equal(order, batching.epoch_order(n, seed, epoch))


def test_epoch_order_depends_on_seed_and_epoch():
    base = batching.epoch_order(50, 7, 0)
    assert not np.array_equal(base, batching.epoch_order(50, 8, 0))
    assert not np.array_equal(base, batching.epoch_order(50, 7, 1))


@PROPS
@given(st.integers(1, 30), st.integers(0, 2**32 - 1), st.integers(1, 4))
def test_batch_at_walks_whole_epochs_in_order(plan_size, seed, epochs):
    walk = [batching.batch_at(plan_size, seed, i) for i in range(plan_size * epochs)]
    for e in range(epochs):
        chunk = walk[e * plan_size : (e + 1) * plan_size]
        assert chunk == batching.epoch_order(plan_size, seed, e).tolist()
        assert sorted(chunk) == list(range(plan_size))  # every batch once per epoch
