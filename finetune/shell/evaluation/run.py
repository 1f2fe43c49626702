"""Evaluate a base model and its adapters side by side on one split: greedy answers scored by
exact match and containment, loss and perplexity on the same rows, predictions row by row."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import msgspec
from msgspec import Struct
from returns.result import Result, Success

from finetune.core import evaluation
from finetune.core.evaluation import Case, Outcome, Scores
from finetune.errors import UserError, unwrap
from finetune.shell.evaluation import rows
from finetune.shell.export import outputs

Log = Callable[[str], None]
AUTO_MARGIN = 8  # --max-tokens 0: the longest reference's tokens plus this many


class Options(Struct, frozen=True, kw_only=True):
    """What `ft eval` and `finetune.evaluate` take besides MODEL, DATA and the adapters."""

    split: str = "test"
    limit: int | None = None  # the first N rows with an answer (None: all)
    max_tokens: int = 0  # 0: the longest reference plus AUTO_MARGIN tokens
    metric: str = "exact"  # exact | contains | loss (loss: no generation)
    answer_after: str | None = None  # text rows' marker (None: the run's recipe's)
    stop: tuple[str, ...] = ()
    batch_size: int = 8
    out: str = ""  # predictions.jsonl ("" = none)
    backend: str | None = None
    device: str | None = None


class Evaluation(Struct, frozen=True, kw_only=True):
    """`ft eval`'s table as a value: one `Scores` for the base, then one per adapter."""

    model: str
    data: str  # the file evaluated
    split: str
    metric: str
    engine: str
    results: tuple[Scores, ...]
    skipped: int = 0  # rows with nothing to answer
    predictions: str = ""
    complete: bool = True  # False after Ctrl-C: `results` hold what was done


def check(options: Options) -> None:
    """Refuse bad settings in one line (before anything loads)."""
    if options.limit is not None and options.limit < 1:
        raise UserError(f"--limit {options.limit}: give how many rows to evaluate (1 or more), or leave it out for all")
    if options.batch_size < 1:
        raise UserError(f"--batch-size {options.batch_size}: must be at least 1")
    if options.max_tokens < 0:
        raise UserError(f"--max-tokens {options.max_tokens}: must be 0 (auto) or more")
    if options.metric not in evaluation.METRICS:
        raise UserError(f"--metric {options.metric}: choose one of {', '.join(evaluation.METRICS)}")
    if any(not s for s in options.stop):
        raise UserError("--stop: a stop string cannot be empty")
    if options.out and not Path(options.out).is_dir():  # its folder is made when the first row is written
        unwrap(outputs.check_folder(Path(options.out), "--out"))


def evaluate(model: str, data: str, adapters: Sequence[str], options: Options, log: Log) -> Evaluation:
    """Load MODEL once and evaluate it alone, then with each adapter; Ctrl-C returns what is done."""
    from finetune import engines
    from finetune.engines import choose
    from finetune.shell.export import adapters as adapter_files

    check(options)
    path = unwrap(rows.split_file(data, options.split))
    for a in adapters:
        unwrap(adapter_files.load_any(a, full=True))
    planned = rows.plan(str(path), adapters)
    quantized = [a for a in adapters if adapter_files.base_quantization(a).value_or(None) is not None]
    full = [a for a in adapters if adapter_files.is_full(a)]  # trained weights: a base of their own
    name, why = choose.for_model(options.backend, model, adapter_quantized=bool(quantized))
    engine = engines.get(name)
    net, tokenizer = unwrap(engine.load(model, device=options.device, why=why, say=log))
    for a in adapters:  # every adapter must fit before any time is spent
        if a not in quantized and a not in full:
            unwrap(swap(engine, net, a))
    net = unwrap(swap(engine, net, None))
    if quantized:
        log(f"Note: {', '.join(quantized)}: trained on a quantized base, which is loaded for it alone")
    results: list[Scores] = []
    cache: dict[Any, rows.Cases] = {}
    skipped, complete = 0, True
    with _writer(options.out) as write, _progress() as progress:
        for label, adapter, rendering in planned:
            recipe = rendering.recipe
            if rendering.key not in cache:
                cache[rendering.key] = unwrap(rows.read(recipe, path, tokenizer, options.limit, options.answer_after,
                                                        rendering.mlx_lm))
            cases = cache[rendering.key]
            skipped = max(skipped, cases.skipped)
            if not cases.cases:
                raise UserError(f"{path}: no rows with an answer to evaluate")
            tic = time.perf_counter()
            if adapter in quantized or adapter in full:
                used = unwrap(engine.load_with(model, adapter))
            else:
                used = net = unwrap(swap(engine, net, adapter))
            scores = _one(engine, used, tokenizer, label, cases, recipe, options, write, progress, tic)
            results.append(msgspec.structs.replace(scores, rendering=rendering.note))
            if not scores.complete:
                complete = False
                break
    return Evaluation(model=model, data=str(path), split=options.split, metric=options.metric, engine=name,
                      results=tuple(results), skipped=skipped, predictions=options.out, complete=complete)


def _one(engine: Any, model: Any, tokenizer: Any, name: str, cases: rows.Cases, recipe: Any,
         options: Options, write: Callable[[dict], None], progress: Any, tic: float) -> Scores:
    """One model on every case: answers (unless metric is loss), then the loss."""
    outcomes: list[Outcome] = []
    generated = options.metric != "loss"
    gen_seconds, loss = 0.0, None
    scored = [c.tokens for c in cases.cases if c.tokens.supervised]
    try:
        if generated:
            start = time.perf_counter()
            for outcome in answers(engine.greedy, model, tokenizer, cases, options, progress.row(name, len(cases.cases))):
                outcomes.append(outcome)
                write({"model": name, **_record(outcome)})
            gen_seconds = time.perf_counter() - start
        progress.note(name, "loss")
        loss = engine.loss(model, scored, _batch(recipe, options.batch_size)) if scored else None
    except KeyboardInterrupt:
        return evaluation.scores(name, outcomes, generated=generated, loss=None, loss_rows=0,
                                 seconds=time.perf_counter() - tic, generate_seconds=gen_seconds, complete=False)
    return evaluation.scores(name, outcomes, generated=generated, loss=loss, loss_rows=len(scored),
                             seconds=time.perf_counter() - tic, generate_seconds=gen_seconds)


def answers(greedy: Callable[..., list[list[int]]], model: Any, tokenizer: Any, cases: rows.Cases, options: Options,
            advance: Callable[[int], None] = lambda n: None) -> Iterator[Outcome]:
    """Greedy answers (an engine's `greedy`) batch by batch, each judged against its reference, in row order."""
    from finetune.shell.generation import decoder

    decode = decoder(tokenizer)
    budget = options.max_tokens or max_reference(cases.cases) + AUTO_MARGIN
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(cases.cases), options.batch_size):
        batch = cases.cases[start : start + options.batch_size]
        stops = [stop_strings(c, cases, options.stop) for c in batch]

        def done(i: int, tokens: list[int], stops: list[tuple[str, ...]] = stops) -> bool:
            text = decode(tokens)
            return evaluation.cut_at_stops(text, stops[i]) != text

        out = greedy(model, [c.prompt for c in batch], budget, cases.stop_ids, done, pad)
        for c, tokens, row_stops in zip(batch, out, stops, strict=True):
            said = evaluation.cut_at_stops(decode(tokens), row_stops)
            yield evaluation.judge(c.line, said, c.reference, len(tokens))
        advance(len(batch))


def stop_strings(case: Case, cases: rows.Cases, extra: Sequence[str]) -> tuple[str, ...]:
    """End-of-turn markers, `--stop` strings, and a newline for a one-line reference."""
    newline = ("\n",) if evaluation.single_line(case.reference) else ()
    return (*cases.stop_strings, *extra, *newline)


def max_reference(cases: Sequence[Case]) -> int:
    """Tokens of the longest answer as training encodes it (its end-of-turn included)."""
    return max((len(c.tokens.ids) - len(c.prompt) for c in cases), default=1)


def _batch(recipe: Any, size: int) -> Any:
    import msgspec

    return msgspec.structs.replace(recipe, train=msgspec.structs.replace(recipe.train, batch_size=size))


def _record(o: Outcome) -> dict:
    return {"line": o.line, "prediction": o.prediction, "reference": o.reference, "exact": o.exact,
            "contains": o.contains, "tokens": o.tokens}


def swap(engine: Any, model: Any, adapter: str | None) -> Result[Any, str]:
    """`model` with its adapter layers removed, then `adapter` (if any) attached: the base stays loaded."""
    bare = engine.bare(model)
    return Success(bare) if adapter is None else engine.attach(bare, adapter)


@contextmanager
def _writer(out: str) -> Iterator[Callable[[dict], None]]:
    """Predictions as JSON lines: the file starts empty, each row is appended and flushed."""
    if not out:
        yield lambda row: None
        return
    path = Path(out)
    if path.is_dir():
        raise UserError(f"--out {out}: a directory; give a file name such as predictions.jsonl")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle: IO[str] = path.open("w", encoding="utf-8")
    except OSError as err:
        raise UserError(f"--out {out}: cannot write ({err.strerror or err})") from None

    def write(row: dict) -> None:
        handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        handle.flush()

    with handle:
        yield write


class _Bars:
    """A rich progress bar per model on stderr (terminals only)."""

    def __init__(self, progress: Any):
        self.progress = progress
        self.tasks: dict[str, Any] = {}

    def row(self, name: str, total: int) -> Callable[[int], None]:
        task = self.tasks[name] = self.progress.add_task(name, total=total, status="answering")
        return lambda n: self.progress.advance(task, n)

    def note(self, name: str, status: str) -> None:
        if name in self.tasks:
            self.progress.update(self.tasks[name], status=status)


@contextmanager
def _progress() -> Iterator[_Bars]:
    from finetune.shell.progress import bars

    progress = bars()
    with progress:
        yield _Bars(progress)
