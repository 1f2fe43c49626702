"""The bundled datasets under data/: reproducible from the generator, well formed, and correct."""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

DATA = Path(__file__).parents[1] / "data"

SPLITS = {
    "sql": ("train", "valid", "test"),
    "chat": ("train", "valid"),
    "instruct": ("train", "valid"),
}
KEYS = {
    "sql": {"prompt", "completion"},
    "chat": {"messages"},
    "instruct": {"instruction", "input", "output"},
}
FILES = [(kind, split) for kind, splits in SPLITS.items() for split in splits]


def load(kind: str, split: str) -> list[dict]:
    raw = (DATA / kind / f"{split}.jsonl").read_bytes()
    assert raw.endswith(b"\n"), "file must end with a newline"
    assert b"\r" not in raw, "LF line endings only"
    text = raw.decode("utf-8")
    rows = []
    for n, line in enumerate(text.split("\n")[:-1], 1):
        assert line.strip(), f"{kind}/{split}.jsonl line {n} is blank"
        row = json.loads(line)
        assert isinstance(row, dict), f"{kind}/{split}.jsonl line {n} is not an object"
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def data() -> dict[tuple[str, str], list[dict]]:
    return {(kind, split): load(kind, split) for kind, split in FILES}


def test_committed_files_match_the_generator():
    proc = subprocess.run(
        [sys.executable, str(DATA / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=DATA.parent,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(("kind", "split"), FILES)
def test_rows_have_the_expected_shape(data, kind, split):
    rows = data[kind, split]
    assert rows
    for i, row in enumerate(rows, 1):
        where = f"{kind}/{split}.jsonl row {i}"
        assert set(row) == KEYS[kind], where
        if kind == "chat":
            check_chat(row["messages"], where)
            continue
        for key, value in row.items():
            assert isinstance(value, str), f"{where}: {key} is not a string"
            if key != "input":  # Alpaca's input may be empty
                assert value.strip(), f"{where}: {key} is empty"


def check_chat(messages, where: str) -> None:
    assert isinstance(messages, list) and messages, where
    for j, m in enumerate(messages):
        assert set(m) == {"role", "content"}, where
        assert m["role"] in ("system", "user", "assistant"), where
        assert m["role"] != "system" or j == 0, f"{where}: system message not first"
        assert isinstance(m["content"], str) and m["content"].strip(), where
    assert messages[-1]["role"] == "assistant", f"{where}: does not end with the assistant"
    turns = [m["role"] for m in messages if m["role"] != "system"]
    assert turns == ["user", "assistant"] * (len(turns) // 2), f"{where}: turns do not alternate"


def test_row_counts(data):
    counts = {f"{k}/{s}": len(rows) for (k, s), rows in data.items()}
    assert counts == {
        "sql/train": 3000,
        "sql/valid": 300,
        "sql/test": 300,
        "chat/train": 400,
        "chat/valid": 40,
        "instruct/train": 800,
        "instruct/valid": 80,
    }


def test_chat_has_system_messages_and_multi_turn_rows(data):
    rows = data["chat", "train"]
    assert any(r["messages"][0]["role"] == "system" for r in rows)
    assert any(r["messages"][0]["role"] != "system" for r in rows)
    assert any(sum(m["role"] == "user" for m in r["messages"]) >= 2 for r in rows)


def test_about_a_third_of_instructions_have_no_input(data):
    rows = data["instruct", "train"]
    share = sum(r["input"] == "" for r in rows) / len(rows)
    assert 0.2 < share < 0.5


def row_key(kind: str, row: dict) -> str:
    if kind == "sql":
        return row["prompt"]
    if kind == "chat":
        return json.dumps(row["messages"], ensure_ascii=False)
    return row["instruction"] + "\x00" + row["input"]


@pytest.mark.parametrize("kind", list(SPLITS))
def test_splits_are_disjoint(data, kind):
    seen: dict[str, str] = {}
    for split in SPLITS[kind]:
        for row in data[kind, split]:
            key = row_key(kind, row)
            assert key not in seen, f"{kind}: a row of {split} is also in {seen.get(key)}"
            seen[key] = split


PROMPT = re.compile(r"\Atable: (\w+)\ncolumns: ([\w, ]+)\nQ: (.+)\nA: \Z")
SQL = re.compile(r"\ASELECT (?:(\w+)|(COUNT|MAX|MIN|AVG|SUM)\((\w+)\)) FROM (\w+) WHERE (.+)\Z")
CONDITION = re.compile(r"(\w+) (=|>|<) ('(?:[^']|'')*'|-?\d+(?:\.\d+)?)(?: AND |\Z)")


@pytest.mark.parametrize("split", SPLITS["sql"])
def test_sql_queries_use_the_table_and_its_columns(data, split):
    for row in data["sql", split]:
        prompt, sql = row["prompt"], row["completion"]
        assert len(prompt.split()) < 120
        assert sql.startswith("SELECT")
        p, q = PROMPT.match(prompt), SQL.match(sql)
        assert p and q, (prompt, sql)
        table, columns, question = p.group(1), p.group(2).split(", "), p.group(3)
        assert q.group(4) == table
        assert (q.group(1) or q.group(3)) in columns
        conditions = CONDITION.findall(q.group(5))
        assert conditions and CONDITION.sub("", q.group(5)) == "", sql
        assert len(conditions) <= 2
        for column, _op, literal in conditions:
            assert column in columns, f"{column} not in columns of {table}: {sql}"
            value = literal[1:-1].replace("''", "'") if literal.startswith("'") else literal
            assert value in question, (value, question)


UPPER = {"Convert the following text to uppercase.", "Rewrite this text in all capital letters."}
LOWER = {"Convert the following text to lowercase.", "Rewrite this text in all lowercase letters."}
SORT_ASC = {
    "Sort these numbers in ascending order.",
    "Arrange the numbers from smallest to largest.",
}
SORT_DESC = {
    "Sort these numbers in descending order.",
    "Arrange the numbers from largest to smallest.",
}
SUM = {"Compute the sum of these numbers.", "Add up the following numbers."}
COUNT = {"Count the words in the following sentence.", "How many words are in this sentence?"}
EXTRACT = {"Extract all the numbers from the text.", "List the numbers that appear in this text."}
MAX = {"Find the largest number in the list.", "Which number in this list is the biggest?"}
ALPHA = {"Put these words in alphabetical order.", "Sort the following words alphabetically."}


def expected_output(instruction: str, text: str) -> str | None:
    """Recompute the answer for the task kinds this test knows; None for the rest."""
    nums = [int(x) for x in text.split(", ")] if re.fullmatch(r"-?\d+(, -?\d+)*", text) else None
    if instruction in UPPER:
        return text.upper()
    if instruction in LOWER:
        return text.lower()
    if instruction in SORT_ASC and nums:
        return ", ".join(map(str, sorted(nums)))
    if instruction in SORT_DESC and nums:
        return ", ".join(map(str, sorted(nums, reverse=True)))
    if instruction in SUM and nums:
        return str(sum(nums))
    if instruction in MAX and nums:
        return str(max(nums))
    if instruction in COUNT:
        return str(len(text.split()))
    if instruction in EXTRACT:
        return ", ".join(re.findall(r"\d+", text))
    if instruction in ALPHA:
        return ", ".join(sorted(text.split(", ")))
    if instruction == "Write the given word backwards.":
        return text[::-1]
    if instruction == "Convert this temperature from Celsius to Fahrenheit.":
        c = int(text.removesuffix(" °C"))
        f = Decimal(c) * 9 / 5 + 32
        shown = f"{f:f}".rstrip("0").rstrip(".") if "." in f"{f:f}" else f"{f:f}"
        return f"{c} °C is {shown} °F."
    if re.match(r"Rewrite the following list|Turn this list into", instruction):
        items = [re.sub(r"^(- |\d+\. )", "", line) for line in text.split("\n")]
        return ", ".join(items)
    return None


def test_instruction_outputs_are_correct(data):
    checked = 0
    for split in SPLITS["instruct"]:
        for row in data["instruct", split]:
            want = expected_output(row["instruction"], row["input"])
            if want is not None:
                assert row["output"] == want, row
                checked += 1
    assert checked > 300  # most rows with an input are recomputed here


WEEKDAY = re.compile(r"\A(\w+) (\d+), (\d+) is a (\w+)\.\Z")
ARITH = re.compile(r"\A(\d+) ([+−×]) (\d+) = (-?\d+)\.\Z")


def test_chat_answers_are_correct(data):
    names = "January February March April May June July August September October November December"
    months = dict(zip(names.split(), range(1, 13), strict=True))
    days = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
    ops = {"+": lambda a, b: a + b, "−": lambda a, b: a - b, "×": lambda a, b: a * b}
    checked = 0
    for split in SPLITS["chat"]:
        for row in data["chat", split]:
            for m in row["messages"]:
                if m["role"] != "assistant":
                    continue
                if w := WEEKDAY.match(m["content"]):
                    date = dt.date(int(w[3]), months[w[1]], int(w[2]))
                    assert days[date.weekday()] == w[4], m["content"]
                    checked += 1
                elif a := ARITH.match(m["content"]):
                    assert ops[a[2]](int(a[1]), int(a[3])) == int(a[4]), m["content"]
                    checked += 1
    assert checked > 50
