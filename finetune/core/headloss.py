"""How many positions go through the LM head at once (pure).

The head and the cross-entropy run over chunks of supervised positions, so the `(N, vocab)`
float32 logits and their gradient are never whole: a chunk holds about `CHUNK_ELEMENTS` logits
(32 MB), e.g. 128 positions of a 49,152-token vocabulary, every position of a small one. Both
engines' losses (`engines/mlx/loss.py`, `engines/torch/loss.py`) and the memory estimate use it.
"""

from __future__ import annotations

CHUNK_ELEMENTS = 1 << 23
ALIGN = 64  # select pads its positions to multiples of 64 (batching), so chunks divide them evenly


def chunk_rows(vocab: int, elements: int = CHUNK_ELEMENTS) -> int:
    """Positions per chunk: a multiple of 64, at least 64, about `elements // vocab`."""
    return max(ALIGN, elements // max(vocab, 1) // ALIGN * ALIGN)


def chunks(n: int, rows: int) -> list[tuple[int, int]]:
    """`[(start, end), ...]` covering `0..n` in pieces of at most `rows`."""
    return [(s, min(s + rows, n)) for s in range(0, n, max(rows, 1))]
