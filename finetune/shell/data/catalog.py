"""`ft train list-data`: what datasets exist here, with rows, splits and formats."""

from __future__ import annotations

from pathlib import Path

from msgspec import Struct
from returns.result import Failure, Result, Success

from finetune.core import prepare
from finetune.files import datasets


class SplitInfo(Struct, frozen=True):
    split: str
    path: str
    rows: int
    bad: int
    formats: dict[str, int]


class DatasetInfo(Struct, frozen=True):
    name: str
    origin: str  # bundled | local | given
    splits: list[SplitInfo]


def describe(spec: str, name: str, origin: str) -> Result[DatasetInfo, str]:
    def info(files: dict[str, Path]) -> DatasetInfo:
        splits = []
        for split, path in files.items():
            rows, read_errors = datasets.read_rows(path)
            samples, errors = prepare.normalise_rows(rows)
            formats: dict[str, int] = {}
            for _, s in samples:
                formats[s.format] = formats.get(s.format, 0) + 1
            splits.append(SplitInfo(split, str(path), len(samples), len(read_errors) + len(errors), formats))
        return DatasetInfo(name, origin, splits)

    return datasets.locate(spec).map(info)


def describe_all(given: list[Path], cwd: Path) -> Result[list[DatasetInfo], str]:
    """Bundled sets, then datasets in `cwd` (and one level below), then the given paths."""
    out: list[DatasetInfo] = []
    wanted = [(n, n, "bundled") for n in datasets.bundled_names()]
    bundled = datasets.bundled_root().resolve()
    wanted += [(str(p), _rel(p, cwd), "local") for p in datasets.local_datasets(cwd) if bundled not in p.resolve().parents]
    wanted += [(str(p), str(p), "given") for p in given]
    for spec, name, origin in wanted:
        match describe(spec, name, origin):
            case Success(info):
                out.append(info)
            case Failure(message):
                if origin == "given":
                    return Failure(message)
    return Success(out)


def _rel(p: Path, cwd: Path) -> str:
    try:
        return str(p.relative_to(cwd))
    except ValueError:
        return str(p)
