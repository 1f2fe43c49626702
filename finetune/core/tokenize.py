"""Rendered segments -> token ids and a loss mask (pure; the tokenizer enters as `encode`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from msgspec import Struct

Encode = Callable[[str], list[int]]


class Specials(Struct, frozen=True, kw_only=True):
    """What a template and the tokenizer agree on: BOS/EOS text and ids (-1 = none)."""

    bos: str = ""
    eos: str = ""
    bos_id: int = -1
    eos_id: int = -1
    add_bos: bool = False  # the tokenizer's own convention: does a sequence start with BOS?


class Segment(Struct, frozen=True):
    """A piece of rendered text; `train` marks tokens that carry loss."""

    text: str
    train: bool


class Tokens(Struct, frozen=True):
    """`mask[t]` is 1 when token `t` is a target (predicted from tokens `< t`)."""

    ids: tuple[int, ...]
    mask: tuple[int, ...]

    @property
    def supervised(self) -> int:
        return sum(self.mask)


def tokenize(segments: Sequence[Segment], encode: Encode, specials: Specials) -> Tokens:
    """Encode each segment on its own so a prompt's ids are a prefix of the whole's ids."""
    ids: list[int] = []
    mask: list[int] = []
    for seg in segments:
        if not seg.text:
            continue
        piece = encode(seg.text)
        ids += piece
        mask += [int(seg.train)] * len(piece)
    if specials.add_bos and specials.bos_id >= 0 and (not ids or ids[0] != specials.bos_id):
        ids.insert(0, specials.bos_id)
        mask.insert(0, 0)
    if len(ids) > 1 and ids[0] == ids[1] == specials.bos_id:  # template text and tokenizer both
        del ids[0], mask[0]
    if mask:
        mask[0] = 0  # the first token is never predicted
    return Tokens(tuple(ids), tuple(mask))


def truncate(tokens: Tokens, max_length: int) -> Tokens:
    """Keep the first `max_length` tokens (mlx-lm's convention)."""
    if len(tokens.ids) <= max_length:
        return tokens
    return Tokens(tokens.ids[:max_length], tokens.mask[:max_length])
