"""Rank shares of a planned batch (`engines.protocol.batch_share`, what both engines' ranks train):
together they are the whole batch once, in order, and their counts add up to the batch's."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from finetune.core import batching
from finetune.core.tokenize import Tokens
from finetune.engines.protocol import Data, batch_share

PROPS = settings(max_examples=60, deadline=None)


@st.composite
def tokens_st(draw) -> Tokens:
    """A valid `Tokens`: ids >= 1 (0 pads), mask[0] = 0 as `tokenize` makes it."""
    n = draw(st.integers(2, 40))
    ids = draw(st.lists(st.integers(1, 999), min_size=n, max_size=n))
    mask = [0] + draw(st.lists(st.integers(0, 1), min_size=n - 1, max_size=n - 1))
    return Tokens(tuple(ids), tuple(mask))


@PROPS
@given(st.lists(tokens_st(), min_size=1, max_size=12), st.integers(1, 6), st.integers(1, 6), st.integers(1, 3))
def test_rank_shares_cover_the_batch_once_and_their_counts_add_up(examples, batch_size, ranks, parts):
    plan = batching.length_sorted([len(t.ids) for t in examples], batch_size)
    data = Data(examples, plan)
    for index, rows in enumerate(plan):
        whole = batching.make_batch([[examples[i] for i in row] for row in rows], 64)
        seen, supervised, tokens = [], 0, 0
        for rank in range(ranks):
            mine = batching.shares(rows, ranks)[rank]
            for part in range(parts):
                b = batch_share(data, index, 64, rank, ranks, part, parts)
                share = batching.shares(mine, parts)[part]
                seen += share
                supervised, tokens = supervised + b.supervised, tokens + b.tokens
                assert float(b.weights.sum()) == b.supervised  # an empty share weighs nothing
                if not share:
                    assert b.inputs.shape[0] == 1 and not b.weights.any()
        assert seen == rows  # every row once, in plan order
        assert (supervised, tokens) == (whole.supervised, whole.tokens)
        assert np.isclose(supervised, whole.weights.sum())
