"""Batch plans and batch arrays (pure; numpy with explicit seeds).

A plan is a list of batches, each a list of rows, each a list of example indices (one per row
unless packed). Batches hold rows of similar length (sorted, then chunked) and their order is
shuffled per epoch from `(seed, epoch)`, so any step's batch can be recomputed on resume.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from msgspec import Struct

from finetune.core.tokenize import Tokens

PAD_MULTIPLE = 32


class Batch(Struct, frozen=True, kw_only=True):
    """Model inputs and the supervised targets, as numpy arrays."""

    inputs: np.ndarray  # (B, T) int32, T a multiple of 32
    select: np.ndarray  # (N,) int32 flat indices into inputs of supervised positions
    targets: np.ndarray  # (N,) int32 next token at each selected position
    weights: np.ndarray  # (N,) float32, 0 where `select` is padding
    segments: np.ndarray | None = None  # (B, T) document ids for packed rows
    positions: np.ndarray | None = None  # (B, T) position within the document
    tokens: int = 0  # predicting positions that are not padding (row length - 1 per row)
    supervised: int = 0

    @property
    def padding_efficiency(self) -> float:
        return self.tokens / self.inputs.size if self.inputs.size else 0.0


def length_sorted(lengths: Sequence[int], batch_size: int) -> list[list[list[int]]]:
    """Examples sorted by length (ties by index) and chunked: one example per row."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [[[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]


def packed(lengths: Sequence[int], batch_size: int, capacity: int) -> list[list[list[int]]]:
    """First-fit decreasing: examples into rows of at most `capacity` tokens, rows into batches."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = min(lengths[i], capacity)
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(capacity - n)
    rows.sort(key=lambda r: (sum(min(lengths[i], capacity) for i in r), r[0]))
    return [rows[s : s + batch_size] for s in range(0, len(rows), batch_size)]


def shares(rows: Sequence[Sequence[int]], parts: int) -> list[list[list[int]]]:
    """Split one planned batch's rows into `parts` contiguous shares whose sizes differ by at most 1.

    The plan stays global: a rank of a data-parallel run, or one micro-step of a batch split to
    fit memory, takes one share. Shares may be empty when `parts` exceeds the rows; the loss is
    token-weighted, so summing the shares' gradients and token counts gives the whole batch's.
    """
    assert parts >= 1, parts
    size, extra = divmod(len(rows), parts)
    out, at = [], 0
    for p in range(parts):
        n = size + (p < extra)
        out.append([list(r) for r in rows[at : at + n]])
        at += n
    return out


def epoch_order(n_batches: int, seed: int, epoch: int) -> np.ndarray:
    """The order batches are visited in during `epoch`."""
    rng = np.random.Generator(np.random.PCG64([seed, epoch]))
    return rng.permutation(n_batches)


def batch_at(plan_size: int, seed: int, index: int) -> int:
    """The plan index of the `index`-th batch of the run (epochs follow each other)."""
    epoch, within = divmod(index, plan_size)
    return int(epoch_order(plan_size, seed, epoch)[within])


def make_batch(rows: Sequence[Sequence[Tokens]], max_length: int, select_multiple: int = 64) -> Batch:
    """Concatenate each row's examples, pad to `1 + 32k` tokens, and list the targets.

    Inputs are `row[:-1]`, targets `row[1:]`; a target counts where its mask is 1. Packed rows
    (several examples) also get per-token document ids and positions that restart per document.
    """
    packed_rows = any(len(r) > 1 for r in rows)
    seqs, masks, segs, poss = [], [], [], []
    for row in rows:
        ids: list[int] = []
        mask: list[int] = []
        seg: list[int] = []
        pos: list[int] = []
        for d, tok in enumerate(row):
            n = min(len(tok.ids), max_length - len(ids))
            ids += tok.ids[:n]
            mask += (0, *tok.mask[1:n]) if n else ()  # a document's first token is never a target
            seg += [d] * n
            pos += range(n)
        seqs.append(ids), masks.append(mask), segs.append(seg), poss.append(pos)
    longest = max(len(s) for s in seqs)
    width = PAD_MULTIPLE * -(-(longest - 1) // PAD_MULTIPLE) + 1  # inputs: a multiple of 32
    b = len(rows)
    full = np.zeros((b, width), np.int32)
    target_mask = np.zeros((b, width), np.int32)
    segments = np.full((b, width), -1, np.int32)
    positions = np.zeros((b, width), np.int32)
    for r in range(b):
        n = len(seqs[r])
        full[r, :n], target_mask[r, :n] = seqs[r], masks[r]
        segments[r, :n], positions[r, :n] = segs[r], poss[r]
    inputs, supervised = full[:, :-1], target_mask[:, 1:]
    flat = np.flatnonzero(supervised.reshape(-1)).astype(np.int32)
    count = len(flat)
    n_sel = max(select_multiple, select_multiple * -(-count // select_multiple))
    select = np.zeros(n_sel, np.int32)
    select[:count] = flat
    targets = np.zeros(n_sel, np.int32)
    targets[:count] = full[:, 1:].reshape(-1)[flat]
    weights = np.zeros(n_sel, np.float32)
    weights[:count] = 1.0
    tokens = sum(min(len(s), width) - 1 for s in seqs if s)
    return Batch(
        inputs=np.ascontiguousarray(inputs),
        select=select,
        targets=targets,
        weights=weights,
        segments=np.ascontiguousarray(segments[:, :-1]) if packed_rows else None,
        positions=np.ascontiguousarray(positions[:, :-1]) if packed_rows else None,
        tokens=tokens,
        supervised=count,
    )
