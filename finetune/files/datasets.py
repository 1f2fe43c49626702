"""Dataset files: locate (bundled name, file, split directory) and read rows with line numbers."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from returns.result import Failure, Result, Success

from finetune.core.records import RowError

SPLITS = ("train", "valid", "test")
SUFFIXES = (".jsonl", ".json")
Rows = list[tuple[int, Any]]  # (1-based line, parsed JSON value)


def bundled_root() -> Path:
    """`data/` of a source checkout, or the copy packed into the wheel."""
    here = Path(__file__).resolve().parent.parent  # the package: data/ and recipes/ sit beside it
    for candidate in (here.parent / "data", here / "bundled"):
        if candidate.is_dir():
            return candidate
    return here.parent / "data"


def bundled_names() -> list[str]:
    root = bundled_root()
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _split_files(p)) if root.is_dir() else []


def locate(spec: str) -> Result[dict[str, Path], str]:
    """A dataset spec -> `{split: file}`; a single file is the train split."""
    path = Path(os.path.expanduser(spec))
    if path.is_file():
        if path.suffix not in SUFFIXES:
            return Failure(f"{spec}: expected a .jsonl or .json file, got '{path.suffix or 'no suffix'}'")
        return Success({"train": path})
    if path.is_dir():
        splits = _split_files(path)
        if "train" not in splits:
            return Failure(f"{spec}: a dataset directory needs train.jsonl (and optionally valid.jsonl, test.jsonl)")
        return Success(splits)
    if spec in bundled_names():
        return Success(_split_files(bundled_root() / spec))
    names = ", ".join(bundled_names()) or "none"
    return Failure(f"{spec}: no such file, directory or bundled dataset (bundled: {names})")


def _split_files(directory: Path) -> dict[str, Path]:
    found = {}
    for split in SPLITS:
        for suffix in SUFFIXES:
            f = directory / f"{split}{suffix}"
            if f.is_file():
                found[split] = f
                break
    return found


def read_rows(path: Path) -> tuple[Rows, list[RowError]]:
    """Every row of a .jsonl or .json file; bad lines become `RowError`s instead of stopping."""
    data = path.read_bytes()
    if path.suffix == ".json":
        return _read_json_array(data)
    rows: Rows = []
    errors: list[RowError] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            errors.append(RowError(number, "encoding", f"not valid UTF-8 (byte {err.start + 1} of the line)"))
            continue
        try:
            rows.append((number, json.loads(text)))
        except json.JSONDecodeError as err:
            errors.append(RowError(number, "json", f"bad JSON: {err.msg} (column {err.colno})"))
    return rows, errors


def _read_json_array(data: bytes) -> tuple[Rows, list[RowError]]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        return [], [RowError(line, "encoding", "not valid UTF-8; the whole .json file is unreadable")]
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, 0)
    if pos >= len(text) or text[pos] != "[":
        return [], [RowError(_line(text, pos), "json", "a .json dataset must be an array of rows")]
    rows: Rows = []
    pos = _skip_ws(text, pos + 1)
    if pos < len(text) and text[pos] == "]":
        return rows, []
    while True:
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            return rows, [RowError(err.lineno, "json", f"bad JSON: {err.msg} (column {err.colno}); rows after it were not read")]
        rows.append((_line(text, pos), value))
        pos = _skip_ws(text, end)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            return rows, []
        return rows, [RowError(_line(text, pos), "json", "bad JSON: expected ',' or ']' between rows")]


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def local_datasets(root: Path) -> Iterator[Path]:
    """Datasets in `root` and one level below: .jsonl/.json files and split directories."""
    if not root.is_dir():
        return
    for p in sorted(root.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_file() and p.suffix in SUFFIXES or p.is_dir() and "train" in _split_files(p):
            yield p
