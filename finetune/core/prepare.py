"""Rows -> Samples -> Tokens, with per-row errors and the statistics a report needs (pure)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from msgspec import Struct
from returns.result import Failure, Success

from finetune.core.records import RowError, Sample, normalise
from finetune.core.templates import Supervise, Template, render
from finetune.core.tokenize import Encode, Specials, Tokens, tokenize, truncate


class Encoded(Struct, frozen=True):
    line: int
    format: str
    tokens: Tokens  # after truncation
    length: int  # before truncation


class SplitStats(Struct, frozen=True, kw_only=True):
    rows: int
    usable: int
    formats: dict[str, int]
    errors: dict[str, int]
    length_min: int = 0
    length_median: int = 0
    length_p95: int = 0
    length_max: int = 0
    truncated: int = 0
    tokens: int = 0
    supervised: int = 0
    nothing_to_learn: int = 0

    @property
    def supervised_share(self) -> float:
        return self.supervised / self.tokens if self.tokens else 0.0


def normalise_rows(
    rows: Iterable[tuple[int, Any]], forced: str = "auto"
) -> tuple[list[tuple[int, Sample]], list[RowError]]:
    """Check every row; keep the good ones and collect every bad one."""
    good: list[tuple[int, Sample]] = []
    bad: list[RowError] = []
    for line, value in rows:
        match normalise(value, line, forced):
            case Success(sample):
                good.append((line, sample))
            case Failure(error):
                bad.append(error)
    return good, bad


def encode_samples(
    samples: Iterable[tuple[int, Sample]],
    templates: Mapping[str, Template],
    specials: Specials,
    encode: Encode,
    supervise: Supervise,
    max_length: int,
) -> tuple[list[Encoded], list[RowError]]:
    """Render and tokenize each sample with the template chosen for its format."""
    out: list[Encoded] = []
    bad: list[RowError] = []
    for line, sample in samples:
        match render(sample, templates.get(sample.format, "plain"), specials, supervise):
            case Success(segments):
                full = tokenize(segments, encode, specials)
                out.append(Encoded(line, sample.format, truncate(full, max_length), len(full.ids)))
            case Failure(message):
                bad.append(RowError(line, "template", message))
    return out, bad


def summarise(rows: int, encoded: list[Encoded], errors: Iterable[RowError], max_length: int) -> SplitStats:
    """Counts, length percentiles (before truncation) and supervision after truncation."""
    lengths = sorted(e.length for e in encoded)
    errs = Counter(e.kind for e in errors)
    base = dict(
        rows=rows,
        usable=sum(1 for e in encoded if e.tokens.supervised),
        formats=dict(sorted(Counter(e.format for e in encoded).items())),
        errors=dict(sorted(errs.items())),
    )
    if not lengths:
        return SplitStats(**base)
    return SplitStats(
        **base,
        length_min=lengths[0],
        length_median=percentile(lengths, 50),
        length_p95=percentile(lengths, 95),
        length_max=lengths[-1],
        truncated=sum(1 for n in lengths if n > max_length),
        tokens=sum(len(e.tokens.ids) for e in encoded),
        supervised=sum(e.tokens.supervised for e in encoded),
        nothing_to_learn=sum(1 for e in encoded if not e.tokens.supervised),
    )


def summarise_untokenized(rows: int, samples: list[tuple[int, Sample]], errors: Iterable[RowError]) -> SplitStats:
    """Row counts and formats only, for when no tokenizer is at hand."""
    return SplitStats(
        rows=rows,
        usable=len(samples),
        formats=dict(sorted(Counter(s.format for _, s in samples).items())),
        errors=dict(sorted(Counter(e.kind for e in errors).items())),
    )


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return 0
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(min(rank, len(sorted_values))) - 1]
