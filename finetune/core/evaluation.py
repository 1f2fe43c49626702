"""Task evaluation (pure): a row split into the prompt training sees and the reference after it,
exact match and `contains` on whitespace-collapsed text, one model's scores.

The prompt is cut from the row's own training tokens, so it is exactly the prefix training sees:
chat, completions and instruction rows up to the last assistant turn's content (the template's
generation header included); text rows up to the `answer_after` marker (its end included).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from msgspec import Struct
from returns.result import Failure, Result, Success

from finetune.core.records import RowError, Sample
from finetune.core.templates import Supervise, Template, render
from finetune.core.tokenize import Encode, Segment, Specials, Tokens, tokenize, truncate

Decode = Callable[[Sequence[int]], str]
Done = Callable[[int, list[int]], bool]  # (row, its tokens so far) -> its answer has ended
METRICS = ("exact", "contains", "loss")


class Case(Struct, frozen=True, kw_only=True):
    """One row to answer: `prompt` (token ids) is a prefix of `tokens.ids` before truncation."""

    line: int
    prompt: tuple[int, ...]
    reference: str
    tokens: Tokens  # the whole row as training encodes it (truncated), for the loss


class Outcome(Struct, frozen=True, kw_only=True):
    """One row answered: what the model said against the reference."""

    line: int
    prediction: str
    reference: str
    exact: bool
    contains: bool
    tokens: int  # tokens generated


class Scores(Struct, frozen=True, kw_only=True):
    """One model (the base, or base + one adapter) on the evaluated rows."""

    name: str
    rows: int  # rows answered (0 with metric "loss")
    exact: float | None  # share of rows answered exactly; None when nothing was generated
    contains: float | None  # share of rows whose answer contains the reference
    loss: float | None  # token-weighted cross-entropy on the supervised tokens
    perplexity: float | None
    seconds: float
    tokens_per_second: float  # generated tokens per second of generation
    generated_tokens: int = 0
    loss_rows: int = 0  # rows with supervised tokens the loss covers
    complete: bool = True  # False when interrupted before every row was answered
    rendering: str = ""  # how the rows were rendered for this model (whose convention, which template)


def collapse(text: str) -> str:
    """Whitespace runs become one space; leading and trailing whitespace go."""
    return " ".join(text.split())


def judge(line: int, prediction: str, reference: str, tokens: int) -> Outcome:
    """Exact match and containment after collapsing whitespace on both sides."""
    said, wanted = collapse(prediction), collapse(reference)
    return Outcome(line=line, prediction=prediction, reference=reference, exact=said == wanted,
                   contains=wanted in said, tokens=tokens)


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string (exclusive)."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return text[: min(hits)] if hits else text


def extend_answers(out: list[list[int]], active: list[bool], tokens: Sequence[int], stops: frozenset[int],
                   done: Done) -> bool:
    """One greedy step's `tokens` (one per row) onto the active rows' answers, in place: a stop token
    (not kept) or `done` ends a row. Whether any row is still active."""
    for i, t in enumerate(tokens):
        if not active[i]:
            continue
        if t in stops:
            active[i] = False
            continue
        out[i].append(t)
        if done(i, out[i]):
            active[i] = False
    return any(active)


def single_line(reference: str) -> bool:
    """A reference that fits on one line: its answer ends at the first newline."""
    return "\n" not in reference.strip()


def case(
    line: int,
    sample: Sample,
    template: Template,
    specials: Specials,
    encode: Encode,
    decode: Decode,
    *,
    answer_after: str = "",
    supervise: Supervise = "assistant",
    max_length: int = 1 << 30,
) -> Result[Case, RowError]:
    """Split one row into its prompt and reference; kind `empty` marks a row with nothing to answer."""
    if sample.format == "text":
        return _text_case(line, sample, specials, encode, decode, answer_after, max_length)
    match render(sample, template, specials, supervise):
        case Success(segments):
            pass
        case Failure(message):
            return Failure(RowError(line, "template", message))
    last = max((i for i, m in enumerate(sample.messages) if m.role == "assistant"), default=-1)
    if last < 0:
        return Failure(RowError(line, "empty", "no assistant turn to answer"))
    # The prompt ends where the last assistant turn's content begins: the last run of segments
    # an "all-assistant" rendering trains.
    marked = render(sample, template, specials, "assistant").unwrap()
    start = _last_run_start(marked)
    full = tokenize(segments, encode, specials)
    prompt = tokenize(marked[:start], encode, specials).ids
    if not prompt:
        return Failure(RowError(line, "empty", "the prompt renders to no tokens"))
    reference = sample.messages[last].content
    return Success(Case(line=line, prompt=prompt, reference=reference, tokens=truncate(full, max_length)))


def supervise_from(tokens: Tokens, start: int) -> Tokens:
    """`tokens` with every target from index `start` on trained and none before (mlx-lm's loss
    mask: its prompt offset with --mask-prompt, else 0); the first token is never a target."""
    return Tokens(tokens.ids, tuple(int(k >= max(start, 1)) for k in range(len(tokens.ids))))


def _last_run_start(segments: Sequence[Segment]) -> int:
    """Index of the first segment of the last run of trained segments."""
    i = len(segments)
    while i and not segments[i - 1].train:
        i -= 1
    while i and segments[i - 1].train:
        i -= 1
    return i


def _text_case(
    line: int, sample: Sample, specials: Specials, encode: Encode, decode: Decode, marker: str, max_length: int
) -> Result[Case, RowError]:
    if not marker:
        return Failure(RowError(line, "shape", "text rows need an answer marker: give --answer-after (e.g. 'A: ')"))
    at = sample.text.find(marker)
    if at < 0:
        return Failure(RowError(line, "shape", f"no {marker!r} in the text (the --answer-after marker)"))
    head = sample.text[: at + len(marker)]
    full = tokenize(render(sample, "plain", specials).unwrap(), encode, specials)
    skip = 1 if full.ids and full.ids[0] == specials.bos_id and specials.add_bos else 0
    end, said = _prefix_tokens(full.ids, skip, skip + len(encode(sample.text)), head, decode)
    if end == 0:
        return Failure(RowError(line, "empty", "the prompt renders to no tokens"))
    reference = sample.text[len(said):]
    return Success(Case(line=line, prompt=full.ids[:end], reference=reference, tokens=truncate(full, max_length)))


def _prefix_tokens(ids: Sequence[int], start: int, stop: int, head: str, decode: Decode) -> tuple[int, str]:
    """(k, text) for the most tokens `ids[:k]` whose text (from `start`) is a prefix of `head`.

    Tokens are never split: a token that straddles the marker's end stays with the answer, as
    training saw it (byte-level BPE merges "A: SELECT" into "A", ":", " SELECT").
    """
    best, text = start, ""
    for k in range(start + 1, stop + 1):
        said = decode(ids[start:k])
        if head.startswith(said):
            best, text = k, said
        elif len(said) > len(head) + 8:  # past the marker for good
            break
    return best, text


def scores(
    name: str,
    outcomes: Sequence[Outcome],
    *,
    generated: bool,
    loss: float | None,
    loss_rows: int,
    seconds: float,
    generate_seconds: float,
    complete: bool = True,
) -> Scores:
    """Aggregate one model's outcomes (shares over the rows answered)."""
    n = len(outcomes)
    tokens = sum(o.tokens for o in outcomes)
    share = (lambda k: sum(k(o) for o in outcomes) / n) if n else (lambda k: 0.0)
    return Scores(
        name=name, rows=n,
        exact=share(lambda o: o.exact) if generated else None,
        contains=share(lambda o: o.contains) if generated else None,
        loss=loss, perplexity=_perplexity(loss), seconds=seconds,
        tokens_per_second=tokens / generate_seconds if generate_seconds > 0 else 0.0,
        generated_tokens=tokens, loss_rows=loss_rows, complete=complete,
    )


def _perplexity(loss: float | None) -> float | None:
    if loss is None:
        return None
    return math.exp(loss) if loss < 700 else math.inf
