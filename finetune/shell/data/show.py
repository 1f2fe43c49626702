"""`ft train validate --show N`: rendered rows token by token, the supervised tokens marked.

As axolotl's preprocess debug view: what the model reads and, marked, what it learns to predict.
Colour on a terminal; on anything else (a pipe, a log file) the supervised spans are bracketed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from msgspec import Struct
from rich.console import Console
from rich.text import Text

from finetune.core import prepare
from finetune.core.config import Recipe
from finetune.files import datasets
from finetune.shell.data import check

OPEN, CLOSE, SEP = "⟦", "⟧", "¦"  # rare in data, so the marks cannot be mistaken for the text
NEWLINE = "↵"
# Alternating shades show where one token ends and the next begins.
SUPERVISED = ("bold green on grey19", "bold green on grey27")
MASKED = ("grey58 on grey11", "grey58 on grey19")


class Shown(Struct, frozen=True):
    """One rendered row: where it came from, how it was rendered, and each token's text."""

    file: str
    split: str
    template: str
    row: prepare.Encoded
    pieces: tuple[str, ...]


def gather(recipe: Recipe, files: dict[str, str], tokenizer: Any, n: int) -> list[Shown]:
    """The first `n` rows that render, from the train split first, then valid and test."""
    tokenizing = check.Tokenizing(tokenizer, tokenizer.chat_template or "")
    decode = _decoder(tokenizer)
    out: list[Shown] = []
    for split, name in files.items():
        rows, _ = datasets.read_rows(Path(name))
        samples, _ = prepare.normalise_rows(rows, recipe.data.format)
        start = 0
        while len(out) < n and start < len(samples):  # render only as many rows as are shown
            chosen: dict[str, str] = {}
            batch = samples[start : start + n - len(out)]
            encoded, _ = check.encode_split(recipe, batch, tokenizing, chosen)
            out += [Shown(name, split, chosen[e.format], e, pieces(e.tokens.ids, decode)) for e in encoded]
            start += len(batch)
        if len(out) >= n:
            break
    return out


def pieces(ids: tuple[int, ...], decode: Callable[[list[int]], str]) -> tuple[str, ...]:
    """Each token's own text, decoded with a few tokens of context before it.

    Decoding a token alone loses what depends on its neighbours (SentencePiece's leading space);
    the difference of two short windows keeps it. A byte-level token that ends inside a UTF-8
    character shows as U+FFFD; the token that completes it shows the whole character.
    """
    out = []
    for i in range(len(ids)):
        start = max(0, i - 4)
        before = decode(list(ids[start:i])).rstrip("\ufffd")  # a character this token completes is its own
        after = decode(list(ids[start : i + 1]))
        out.append(after[len(before) :] if after.startswith(before) else decode([ids[i]]))
    return tuple(out)


def _decoder(tokenizer: Any) -> Callable[[list[int]], str]:
    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) if ids else ""

    return decode


def visible(piece: str) -> str:
    """A token's text with line breaks drawn (↵, then the break) and other controls escaped."""
    out = []
    for ch in piece:
        if ch == "\n":
            out.append(NEWLINE + "\n")
        elif ch == "\t":
            out.append("→")
        elif ch.isprintable() or ch == " ":
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape").decode())
    return "".join(out)


def token_text(shown: Shown, colour: bool, ids: bool = False) -> Text:
    """The row token by token: in colour (supervised green, masked grey, shades alternating per
    token) or plain (supervised spans in ⟦ ⟧, tokens separated by ¦)."""
    text = Text()
    tokens = shown.row.tokens
    inside = False
    for i, (piece, token, learned) in enumerate(zip(shown.pieces, tokens.ids, tokens.mask, strict=True)):
        label = visible(piece)
        if ids:  # the id stays on the token's line
            label = f"{label[:-1]}({token})\n" if label.endswith("\n") else f"{label}({token})"
        if colour:
            text.append(label, style=(SUPERVISED if learned else MASKED)[i % 2])
            continue
        if learned and not inside:
            text.append(OPEN)
        elif inside and not learned:
            text.append(CLOSE)
        elif i:
            text.append(SEP)
        inside = bool(learned)
        text.append(label)
    if inside:
        text.append(CLOSE)
    return text


def header(index: int, shown: Shown) -> str:
    row, tokens = shown.row, shown.row.tokens
    share = tokens.supervised / max(1, len(tokens.ids))
    cut = f", truncated from {row.length}" if row.length > len(tokens.ids) else ""
    return (f"Row {index} · {shown.file}:{row.line} ({shown.split}) · {row.format} rendered with {shown.template} · "
            f"{len(tokens.ids)} tokens{cut}, {tokens.supervised} supervised ({share:.0%})")


def show(rows: list[Shown], out: Console, ids: bool = False) -> None:
    """Print each row's header and its tokens; the legend says how to read the marks."""
    colour = out.is_terminal and out.color_system is not None and not out.no_color
    if not rows:
        out.print("No row to show: every row has an error (listed below).")
        return
    if colour:
        legend = Text("Supervised tokens (what the model learns) ")
        legend.append("in green", style=SUPERVISED[0]).append(", context (masked) ")
        legend.append("in grey", style=MASKED[0]).append("; the shading changes at every token.")
    else:
        legend = Text(f"Supervised tokens (what the model learns) are inside {OPEN} {CLOSE}; the rest is "
                      f"context (masked); {SEP} separates tokens, {NEWLINE} is a line break.")
    if ids:
        legend.append(" Each token's id follows it in parentheses.")
    out.print(legend)
    for i, shown in enumerate(rows, 1):
        out.print()
        out.print(header(i, shown), markup=False, highlight=False)
        out.print(token_text(shown, colour, ids))
    out.print()
