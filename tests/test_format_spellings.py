"""The original spec's `--format mlx` and `--format chat` for `ft train start`, `quick` and
`validate`, and `data.format = "mlx"` in a recipe: mlx means mlx-lm's row formats (chat,
completions, text), each row's detected in mlx_lm.lora's order; instruction rows are refused.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from cli_run import run_cli
from returns.result import Failure, Success

from finetune.core.records import normalise

FAST = ("--batch-size", "2", "--report-every", "1", "--eval-every", "0", "--val-batches", "1",
        "--max-seq-length", "64", "--lora-rank", "2")
CHAT = {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi there"}]}
COMPLETION = {"prompt": "2 + 2 =", "completion": " 4"}
TEXT = {"text": "The quick brown fox jumps over the lazy dog."}
INSTRUCTION = {"instruction": "Add the numbers.", "input": "2 2", "output": "4"}


def dataset(path: Path, *rows: dict, n: int = 8) -> Path:
    path.mkdir()
    for split in ("train", "valid"):
        (path / f"{split}.jsonl").write_text("".join(json.dumps(rows[i % len(rows)]) + "\n" for i in range(n)))
    return path


def validate(capsys, *args) -> tuple[int, dict]:
    code, out, err = run_cli(capsys, "train", "validate", *args, "--model", "tiny", "--json")
    assert "Traceback" not in err
    return code, json.loads(out)


def test_mlx_detects_each_row_among_mlx_lms_formats_in_mlx_lms_order():
    assert normalise(CHAT, 1, "mlx").unwrap().format == "chat"
    assert normalise(COMPLETION, 1, "mlx").unwrap().format == "completions"
    assert normalise(TEXT, 1, "mlx").unwrap().format == "text"
    both = {**CHAT, **COMPLETION}  # mlx_lm.lora takes prompt/completion over messages; auto the reverse
    assert normalise(both, 1, "mlx").unwrap().format == "completions"
    assert normalise(both, 1, "auto").unwrap().format == "chat"


def test_mlx_refuses_instruction_rows_saying_what_to_use():
    match normalise(INSTRUCTION, 3, "mlx"):
        case Failure(error):
            assert (error.line, error.kind) == (3, "shape")
            assert "not one of mlx-lm's row shapes (keys: input, instruction, output)" in error.message
            assert "messages | prompt+completion | text" in error.message
            assert "--format auto or instruction" in error.message
        case Success(sample):
            pytest.fail(f"instruction row accepted as {sample}")
    assert "instruction rows" not in normalise({"question": "?"}, 1, "mlx").failure().message


def test_validate_takes_format_mlx_and_counts_each_rows_format(tmp_path, capsys):
    data = dataset(tmp_path / "mixed", CHAT, COMPLETION, TEXT, n=9)
    code, report = validate(capsys, data, "--format", "mlx")
    assert code == 0, report["findings"]
    assert report["recipe"]["data"]["format"] == "mlx"
    assert report["splits"]["train"]["formats"] == {"chat": 3, "completions": 3, "text": 3}


def test_validate_format_mlx_reports_instruction_rows_by_file_and_line(tmp_path, capsys):
    data = dataset(tmp_path / "alpaca", INSTRUCTION)
    code, report = validate(capsys, data, "--format", "mlx")
    assert code == 2
    first = report["row_errors"][0]
    assert first["file"].endswith("train.jsonl") and first["error"]["line"] == 1
    assert "--format auto or instruction" in first["error"]["message"]
    assert validate(capsys, data, "--format", "auto")[0] == 0


def test_validate_takes_format_chat(tmp_path, capsys):
    code, report = validate(capsys, dataset(tmp_path / "chat", CHAT), "--format", "chat")
    assert code == 0 and report["splits"]["train"]["formats"] == {"chat": 8}
    code, report = validate(capsys, dataset(tmp_path / "sql", COMPLETION), "--format", "chat")
    assert code == 2 and "chat row needs field 'messages'" in report["row_errors"][0]["error"]["message"]


def test_start_with_format_mlx_writes_it_to_the_run_and_resumes_with_it(tmp_path, capsys):
    data, out = dataset(tmp_path / "mixed", CHAT, COMPLETION, TEXT), tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "start", "tiny", data, "--format", "mlx", *FAST, "--save-every", "2",
                           "--output", out, "--iters", "2")
    assert code == 0, err
    assert tomllib.loads((out / "recipe.toml").read_text())["data"]["format"] == "mlx"
    code, _, err = run_cli(capsys, "train", "start", "tiny", data, "--format", "mlx", *FAST, "--save-every", "2",
                           "--output", out, "--iters", "3", "--resume")
    assert code == 0, err
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
    code, _, err = run_cli(capsys, "train", "start", "tiny", data, "--format", "auto", *FAST, "--output", out,
                           "--iters", "4", "--resume")
    assert code == 2 and "made with a different recipe ($.data.format" in err


def test_a_recipe_with_format_mlx_trains_and_its_written_recipe_loads_back(tmp_path, capsys):
    data = dataset(tmp_path / "sql", COMPLETION)
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[model]\npath = "tiny"\n\n[data]\npath = "{data}"\nformat = "mlx"\n')
    code, _, err = run_cli(capsys, "train", "start", "--recipe", recipe, *FAST, "--output", tmp_path / "a", "--iters", "2")
    assert code == 0, err
    code, _, err = run_cli(capsys, "train", "start", "--recipe", tmp_path / "a" / "recipe.toml", *FAST,
                           "--output", tmp_path / "a", "--iters", "3", "--resume")
    assert code == 0, err


@pytest.mark.parametrize(("spelling", "rows"), [("mlx", (COMPLETION, TEXT)), ("chat", (CHAT,))])
def test_quick_takes_both_spellings(tmp_path, capsys, monkeypatch, spelling, rows):
    monkeypatch.chdir(tmp_path)
    data = dataset(tmp_path / "d", *rows)
    code, out, err = run_cli(capsys, "train", "quick", "tiny", data, "--format", spelling, *FAST, "--output", "q",
                             "--iters", "2")
    assert code == 0, err
    assert tomllib.loads((tmp_path / "q" / "recipe.toml").read_text())["data"]["format"] == spelling


@pytest.mark.parametrize("command", ["start", "quick", "validate"])
def test_help_says_what_mlx_means(capsys, command):
    code, out, _ = run_cli(capsys, "train", command, "--help")
    assert code == 0
    flat = " ".join(out.replace("│", " ").split())
    assert "mlx (mlx-lm's formats only: chat, completions, text" in flat
