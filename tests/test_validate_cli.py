"""`ft train validate` and `ft train list-data` in-process: exit codes, stdout, one-line errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from cli_run import one_line_error
from cli_run import run_cli as run

ROOT = Path(__file__).parents[1]

CHAT_ROWS = [
    {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "how are you?"},
            {"role": "assistant", "content": "fine"},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "what is the answer"},
            {"role": "assistant", "content": "42"},
        ]
    },
]
SQL_ROWS = [
    {
        "prompt": f"table: users\ncolumns: name, age\nQ: name of user {i}?\nA: ",
        "completion": f"SELECT name FROM users WHERE id = {i}",
    }
    for i in range(6)
]


def jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path






def validate(capsys, target, model, *extra: str, length: int = 128, batch: int = 1):
    """`ft train validate TARGET --model M --max-seq-length L --batch-size B ...` -> (code, out, err)."""
    flags = ["--max-seq-length", str(length), "--batch-size", str(batch)]
    return run(capsys, "train", "validate", str(target), "--model", str(model), *flags, *extra)


def report(
    capsys, target, model, *extra: str, length: int = 128, batch: int = 1
) -> tuple[int, dict]:
    """The same with `--json`, parsed."""
    code, out, err = validate(capsys, target, model, *extra, "--json", length=length, batch=batch)
    assert "Traceback" not in err
    return code, json.loads(out)


def findings(data: dict, level: str, field: str) -> list[str]:
    return [f["message"] for f in data["findings"] if f["level"] == level and f["field"] == field]


@pytest.fixture
def sql_dir(tmp_path) -> Path:
    jsonl(tmp_path / "sql" / "train.jsonl", SQL_ROWS)
    jsonl(tmp_path / "sql" / "valid.jsonl", SQL_ROWS[:2])
    return tmp_path / "sql"


# --- the app ------------------------------------------------------------------------------------


def test_help(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    assert "train" in out


def test_train_validate_help_lists_its_flags(capsys):
    code, out, _ = run(capsys, "train", "validate", "--help")
    assert code == 0
    for flag in ("--model", "--template", "--max-seq-length", "--batch-size", "--json"):
        assert flag in out


def test_quick_recipe_validates(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, out, err = run(capsys, "train", "validate", "recipes/quick.toml")
    assert (code, err) == (0, "")
    assert "OK" in out
    assert "completions: plain" in out


# --- bad input: exit 2, one line, no traceback ---------------------------------------------------


def test_recipe_with_a_bad_field(capsys, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nbatch_size = 0\n")
    code, out, err = run(capsys, "train", "validate", str(path))
    assert code == 2
    assert out == ""
    line = one_line_error(err)
    assert line == f"ft: error: {path}: $.train.batch_size: expected int >= 1, got 0"


def test_recipe_with_an_unknown_field(capsys, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lora:\n  rnak: 4\n")
    code, _, err = run(capsys, "train", "validate", str(path))
    assert code == 2
    assert "$.lora.rnak: unknown field (did you mean 'rank'?" in one_line_error(err)


def test_recipe_with_a_syntax_error(capsys, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[train]\niters = = 3\n")
    code, _, err = run(capsys, "train", "validate", str(path))
    assert code == 2
    line = one_line_error(err)
    assert str(path) in line and "line 2" in line


def test_recipe_that_does_not_exist(capsys, tmp_path):
    code, _, err = run(capsys, "train", "validate", str(tmp_path / "missing.toml"))
    assert code == 2
    assert one_line_error(err) == f"ft: error: {tmp_path / 'missing.toml'}: no such recipe file"


def test_unknown_data_path(capsys, tmp_path):
    code, _, err = run(capsys, "train", "validate", str(tmp_path / "nowhere.jsonl"))
    assert code == 2
    line = one_line_error(err)
    assert "nowhere.jsonl: no such file, directory or bundled dataset" in line
    assert "chat" in line and "instruct" in line and "sql" in line


def test_bad_flag_value(capsys, sql_dir, model_dir):
    code, _, err = validate(capsys, sql_dir, model_dir, batch=0)
    assert code == 2
    assert (
        one_line_error(err)
        == "ft: error: command line: $.train.batch_size: expected int >= 1, got 0"
    )


def test_model_that_does_not_exist(capsys, sql_dir, tmp_path):
    code, out, _ = validate(capsys, sql_dir, tmp_path / "nomodel")
    assert code == 2
    assert "nomodel" in out and "$.model.path" in out


# --- data findings ------------------------------------------------------------------------------


def test_bad_rows_are_listed_by_file_and_line(capsys, tmp_path, model_dir):
    data = tmp_path / "data"
    train = jsonl(
        data / "train.jsonl",
        [
            CHAT_ROWS[0],
            {"text": 5},
            SQL_ROWS[0],
            {"messages": [{"role": "bot", "content": "hi"}]},
            "{oops",
            {"instruction": "Add 2 and 2.", "output": "4"},
            {"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "late"}]},
        ],
    )
    valid = data / "valid.jsonl"
    valid.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    code, out, err = validate(capsys, data, model_dir)
    assert code == 2
    assert "Traceback" not in err
    lines = [line.strip() for line in out.splitlines()]
    expected = [
        f"{train}:2: type: field 'text' must be a string, got number",
        f"{train}:4: role: messages[0].role 'bot' is not one of system, user, assistant",
        f"{train}:5: json: bad JSON: Expecting property name enclosed in double quotes (column 2)",
        f"{train}:7: role: messages[1]: a system message may only come first",
        f"{valid}:2: encoding: not valid UTF-8 (byte 14 of the line)",
    ]
    for row in expected:
        assert row in lines, f"missing {row!r} in:\n{out}"
    assert (
        sum(1 for line in lines if re.match(rf"{re.escape(str(data))}/\w+\.jsonl:\d+: ", line)) == 5
    )
    assert "Bad rows (5)" in out


def test_max_errors_limits_the_listing(capsys, tmp_path, model_dir):
    data = jsonl(tmp_path / "d" / "train.jsonl", [*SQL_ROWS, *({"text": i} for i in range(5))])
    code, out, _ = validate(capsys, data, model_dir, "--max-errors", "2")
    assert code == 2
    listed = [line for line in out.splitlines() if f"{data}:" in line]
    assert [line.strip() for line in listed] == [
        f"{data}:7: type: field 'text' must be a string, got number",
        f"{data}:8: type: field 'text' must be a string, got number",
    ]
    assert "... and 3 more" in out


def test_bad_rows_in_json(capsys, tmp_path, model_dir):
    data = jsonl(tmp_path / "d" / "train.jsonl", [*SQL_ROWS, {"text": ""}])
    code, d = report(capsys, data, model_dir)
    assert code == 2
    assert d["row_errors"] == [
        {
            "file": str(data),
            "error": {"line": 7, "kind": "empty", "message": "field 'text' is empty"},
        }
    ]
    assert d["splits"]["train"]["errors"] == {"empty": 1}
    assert findings(d, "error", "$.data.path") == [
        "train: 1 of 7 rows are bad (1 empty); fix or remove them"
    ]


def test_lone_surrogate_row_is_a_bad_row_not_a_crash(capsys, tmp_path, model_dir):
    data = tmp_path / "d"
    jsonl(data / "train.jsonl", SQL_ROWS)
    with (data / "train.jsonl").open("a", encoding="utf-8") as f:
        f.write('{"text": "half a pair \\ud800 here"}\n')
    code, out, err = validate(capsys, data, model_dir)
    assert "internal error" not in err
    assert code == 2
    assert f"{data / 'train.jsonl'}:7: " in out


def test_json_report(capsys, sql_dir, model_dir):
    code, d = report(capsys, sql_dir, model_dir, batch=2)
    assert code == 0, d["findings"]
    assert set(d["splits"]) == {"train", "valid"}
    train = d["splits"]["train"]
    assert (train["rows"], train["usable"], train["formats"], train["errors"]) == (
        6,
        6,
        {"completions": 6},
        {},
    )
    assert 0 < train["supervised"] < train["tokens"]
    assert (
        train["length_min"]
        <= train["length_median"]
        <= train["length_p95"]
        <= train["length_max"]
        <= 128
    )
    assert train["truncated"] == 0
    assert d["templates"] == {"completions": "plain"}
    assert d["facts"]["context_length"] == 256 and d["facts"]["num_layers"] == 2
    assert d["recipe"]["train"]["batch_size"] == 2 and d["recipe"]["data"]["path"] == str(sql_dir)
    assert not [f for f in d["findings"] if f["level"] == "error"]


def test_truncation_is_found(capsys, sql_dir, model_dir):
    code, d = report(capsys, sql_dir, model_dir, length=8, batch=2)
    train = d["splits"]["train"]
    assert train["truncated"] == 6 and train["length_min"] > 8
    assert train["tokens"] == 6 * 8  # counted after truncation
    warnings = findings(d, "warning", "$.train.max_seq_length")
    assert any(w.startswith("train: 6 rows (100.0%) are longer than 8 tokens") for w in warnings), (
        warnings
    )
    assert code == 2  # the prompts are longer than 8 tokens: nothing is left to learn


def test_nothing_to_learn_after_truncation(capsys, sql_dir, model_dir):
    _, d = report(capsys, sql_dir, model_dir, length=8, batch=2)
    assert d["splits"]["train"]["nothing_to_learn"] == 6
    assert d["splits"]["train"]["usable"] == 0
    assert findings(d, "error", "$.data.path") == ["the train split has no usable rows"]


def test_batch_size_larger_than_the_rows(capsys, sql_dir, model_dir):
    code, d = report(capsys, sql_dir, model_dir, batch=50)
    assert code == 2
    assert findings(d, "error", "$.train.batch_size") == [
        "50 is more than the 6 usable training rows; lower it"
    ]


def test_max_seq_length_above_the_model_context(capsys, sql_dir, model_dir):
    code, d = report(capsys, sql_dir, model_dir, length=512, batch=2)
    assert code == 2
    assert findings(d, "error", "$.train.max_seq_length") == [
        "512 exceeds the model's context of 256 tokens"
    ]


def test_chat_data_with_the_tokenizer_template_but_none_in_the_tokenizer(
    capsys, tmp_path, plain_model_dir
):
    data = jsonl(tmp_path / "chat" / "train.jsonl", CHAT_ROWS)
    code, out, err = validate(capsys, data.parent, plain_model_dir, "--template", "tokenizer")
    assert code == 2
    assert "Traceback" not in err
    for line in (1, 2, 3):
        assert f"{data}:{line}: template: the model's tokenizer has no chat template" in out
    code, d = report(capsys, data.parent, plain_model_dir, "--template", "tokenizer")
    assert d["splits"]["train"]["errors"] == {"template": 3}
    assert d["splits"]["train"]["usable"] == 0


def test_chat_data_with_auto_on_a_tokenizer_without_template_uses_chatml(
    capsys, tmp_path, plain_model_dir
):
    data = jsonl(tmp_path / "chat" / "train.jsonl", CHAT_ROWS)
    jsonl(tmp_path / "chat" / "valid.jsonl", CHAT_ROWS[:1])
    code, d = report(capsys, data.parent, plain_model_dir)
    assert d["templates"] == {"chat": "chatml"}
    assert d["splits"]["train"]["usable"] == 3
    assert code == 0, d["findings"]


def test_template_flag_names_the_template(capsys, tmp_path, model_dir):
    data = jsonl(tmp_path / "chat" / "train.jsonl", CHAT_ROWS)
    _, d = report(capsys, data.parent, model_dir)
    assert d["templates"] == {"chat": "tokenizer (the model's own)"}
    template = tmp_path / "mine.jinja"
    template.write_text(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ '\\n' }}{% endfor %}"
    )
    _, d = report(capsys, data.parent, model_dir, "--template", str(template))
    assert d["templates"] == {"chat": "custom Jinja"}
    assert d["splits"]["train"]["usable"] == 3
    _, d = report(capsys, data.parent, model_dir, "--template", "llama3")
    assert d["templates"] == {"chat": "llama3"}
    code, d = report(capsys, data.parent, model_dir, "--template", "vicuna")
    assert code == 2
    assert d["splits"]["train"]["errors"] == {"template": 3}


def test_forced_format(capsys, sql_dir, model_dir):
    code, d = report(capsys, sql_dir, model_dir, "--format", "text", batch=2)
    assert code == 2
    assert d["splits"]["train"]["errors"] == {"shape": 6}


def test_a_single_file_is_the_train_split(capsys, tmp_path, model_dir):
    data = jsonl(tmp_path / "rows.jsonl", CHAT_ROWS)
    code, d = report(capsys, data, model_dir)
    assert set(d["splits"]) == {"train"}
    assert findings(d, "warning", "$.data.path") == [
        "no valid split: validation loss will not be reported (add valid.jsonl)"
    ]
    assert code == 0


# --- list-data ----------------------------------------------------------------------------------


def bundled_rows(name: str, split: str) -> int:
    return sum(
        1
        for line in (ROOT / "data" / name / f"{split}.jsonl").read_text().splitlines()
        if line.strip()
    )


def test_list_data_shows_bundled_sets_with_row_counts(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    jsonl(tmp_path / "mine" / "train.jsonl", [*CHAT_ROWS, {"text": 1}])
    code, out, err = run(capsys, "train", "list-data", "mine")
    assert (code, err) == (0, "")
    rows = [re.split(r"\s*│\s*", line.strip("│ ")) for line in out.splitlines() if "│" in line]
    named = {r[0]: r for r in rows if r[0]}
    for name in ("chat", "instruct", "sql"):
        assert named[name][1] == "bundled"
        assert named[name][2] == "train"
        assert int(named[name][3].replace(",", "")) == bundled_rows(name, "train")
    assert int(named["sql"][3].replace(",", "")) == 3000
    mine = named["mine"]
    assert (mine[1], mine[2], mine[3], mine[4]) == ("given", "train", "3", "1")
    assert mine[5].startswith("chat 3")


def test_list_data_shows_the_full_path_of_a_given_dataset(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    data = jsonl(tmp_path / "some" / "longer" / "place" / "dataset.jsonl", CHAT_ROWS)
    code, out, _ = run(capsys, "train", "list-data", str(data))
    assert code == 0
    assert str(data) in out


def test_list_data_with_a_missing_path(capsys, tmp_path):
    code, _, err = run(capsys, "train", "list-data", str(tmp_path / "nothing"))
    assert code == 2
    assert "nothing: no such file, directory or bundled dataset" in one_line_error(err)
