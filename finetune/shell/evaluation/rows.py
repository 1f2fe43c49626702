"""A split's rows as evaluation cases: read, normalise, render with the run's template, split."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from msgspec import Struct
from returns.result import Failure, Result, Success

from finetune.core import evaluation, prepare
from finetune.core.config import Recipe
from finetune.core.records import Message
from finetune.errors import UserError
from finetune.files import datasets
from finetune.shell.data import check


class Cases(Struct, frozen=True):
    """The rows to answer, what ends an answer, and how many rows had nothing to answer."""

    cases: list[evaluation.Case]
    stop_ids: tuple[int, ...]  # EOS and single-token end-of-turn markers
    stop_strings: tuple[str, ...]  # end-of-turn markers that take several tokens
    skipped: int  # rows with nothing to answer (a chat without an assistant turn)
    path: str


def split_file(data: str, split: str) -> Result[Path, str]:
    """The file of `split` in DATA (a bundled name or a split directory); a single file is itself."""
    match datasets.locate(data):
        case Success(files):
            pass
        case Failure(message):
            return Failure(message)
    if Path(data).expanduser().is_file():
        return Success(files["train"])
    if split not in files:
        return Failure(f"{data}: no {split} split (has: {', '.join(files)}); pick one with --split")
    return Success(files[split])


def read(recipe: Recipe, path: Path, tokenizer: Any, limit: int | None = None,
         answer_after: str | None = None) -> Result[Cases, str]:
    """The first `limit` rows of `path` (all when None) that have an answer, as cases.

    Templates, supervision and truncation are the recipe's (as training renders the rows); text
    rows split at `answer_after` (default: the recipe's). Bad rows fail with file and line.
    """
    from finetune.files.tokenizer import encoder, specials
    from finetune.shell.generation import build_prompt, decoder

    rows, read_errors = datasets.read_rows(path)
    samples, shape_errors = prepare.normalise_rows(rows, recipe.data.format)
    errors = sorted([*read_errors, *shape_errors], key=lambda e: e.line)
    if errors:
        return Failure(f"{path}:{errors[0].line}: {errors[0].kind}: {errors[0].message}")
    sp, encode, decode = specials(tokenizer), encoder(tokenizer), decoder(tokenizer)
    chat_template = tokenizer.chat_template or ""
    marker = recipe.train.answer_after if answer_after is None else answer_after
    picked: dict[str, Any] = {}
    cases: list[evaluation.Case] = []
    skipped = 0
    stop_ids: dict[int, None] = {}
    stop_strings: dict[str, None] = {}
    for line, sample in samples:
        if limit is not None and len(cases) >= limit:
            break
        if sample.format not in picked:
            match check.template_for(recipe, sample.format, chat_template):
                case Success(t):
                    picked[sample.format] = t
                case Failure(message):
                    return Failure(f"{path}:{line}: {message}")
            stops = build_prompt(tokenizer, messages=(Message("user", "x"),), template=picked[sample.format]).unwrap()
            stop_ids.update(dict.fromkeys(stops.stop_ids))
            stop_strings.update(dict.fromkeys(stops.stop_strings))
        made = evaluation.case(line, sample, picked[sample.format], sp, encode, decode, answer_after=marker,
                               supervise=recipe.data.supervise, max_length=recipe.train.max_seq_length)
        match made:
            case Success(c):
                cases.append(c)
            case Failure(error) if error.kind == "empty":
                skipped += 1
            case Failure(error):
                return Failure(f"{path}:{error.line}: {error.message}")
    return Success(Cases(cases, tuple(stop_ids), tuple(stop_strings), skipped, str(path)))


def recipe_for(data: str, runs: Sequence[str], model_context: int | None = None) -> Recipe:
    """The recipe whose templates and settings render the rows: the first adapter's run recipe
    (recipe.toml beside its adapters) when it has one, else the defaults; DATA is ours."""
    import msgspec

    from finetune.core import recipe as core_recipe
    from finetune.shell import recipes

    base = Recipe()
    for run in runs[:1]:
        file = Path(run) / "recipe.toml"
        if file.is_file():
            match recipes.load(file):
                case Success(found):
                    base = found
                case Failure(message):
                    raise UserError(message)
    with_data = msgspec.structs.replace(base, data=msgspec.structs.replace(base.data, path=data))
    return core_recipe.against_model(with_data, model_context)
