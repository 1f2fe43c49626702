"""`ft train ...` commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from cyclopts import Parameter
from returns.result import Failure, Success

from finetune.errors import UserError

FormatFlag = Literal["auto", "chat", "text", "completions", "instruction"]


def validate(
    target: str,
    /,
    *,
    model: str | None = None,
    template: str | None = None,
    format: FormatFlag | None = None,
    max_seq_length: int | None = None,
    batch_size: int | None = None,
    profile: Literal["none", "chat", "instruction", "code"] | None = None,
    max_errors: Annotated[int, Parameter(name="--max-errors")] = 20,
    json: bool = False,
) -> int:
    """Check a recipe or a dataset without training.

    Reports bad rows by file and line, token-length statistics, truncation, the share of
    supervised tokens, a memory estimate and recommendations. Exits 2 when anything is wrong.

    Parameters
    ----------
    target
        A recipe (.toml, .yaml) or a dataset: a bundled name, a .jsonl/.json file, or a directory with train/valid/test.jsonl.
    model
        Model whose tokenizer and config to check against: local dir, cached hub id, or tiny.
    template
        auto, plain, alpaca, chatml, llama2, llama3, tokenizer, a Jinja string or a file.
    format
        Force one row format instead of detecting each row's.
    max_seq_length
        Longest sequence in tokens; longer rows are truncated.
    batch_size
        Rows per batch.
    profile
        Defaults for chat, instruction or code data.
    max_errors
        How many bad rows to list.
    json
        Print the report as JSON instead of tables.
    """
    from finetune.shell import check, recipes, report

    is_recipe = Path(target).suffix in recipes.SUFFIXES
    flags = dict(model=model, template=template, format=format, max_seq_length=max_seq_length,
                 batch_size=batch_size, profile=profile, data=None if is_recipe else target)
    loaded = recipes.load(target if is_recipe else None, flags)
    if isinstance(loaded, Failure):
        raise UserError(loaded.failure())
    match check.run(loaded.unwrap(), available_gb=_available_gb()):
        case Success(result):
            if json:
                import msgspec

                print(msgspec.json.format(msgspec.json.encode(result)).decode())
            else:
                report.show_check(result, report.console(), max_errors=max_errors)
            return 0 if result.ok else 2
        case Failure(message):
            raise UserError(message)
    raise AssertionError("unreachable")


def list_data(*paths: str) -> int:
    """List bundled datasets, datasets in the current directory, and any PATHS given.

    Parameters
    ----------
    paths
        Extra dataset files or directories to describe.
    """
    from finetune.shell import catalog, report

    entries = catalog.describe_all([Path(p) for p in paths], Path.cwd())
    if isinstance(entries, Failure):
        raise UserError(entries.failure())
    report.show_catalog(entries.unwrap(), report.console())
    return 0


def _available_gb() -> float:
    """Physical memory, the bound that matters on CPU and on Apple's unified memory."""
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    except (ValueError, OSError):
        return 0.0
