"""`ft train validate --show N`: rows token by token with the supervised tokens marked, as training
sees them (real tokenizers, the real read/render/tokenize path; no weights needed)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

from cli_run import one_line_error, run_cli
from rich.console import Console
from test_sentencepiece import sp_tokenizer  # noqa: F401 (a fixture: a Metaspace tokenizer)

from finetune.files.tokenizer import load_tokenizer
from finetune.shell import recipes
from finetune.shell.data import show

SQL = [{"prompt": f"table: users\nQ: What is the name of row {i}?\nA: ", "completion": f"SELECT name FROM users WHERE id = {i}"}
       for i in range(3)]
CHAT = {"messages": [{"role": "system", "content": "You are fine."}, {"role": "user", "content": "hello"},
                     {"role": "assistant", "content": "hello world"}, {"role": "user", "content": "how are you?"},
                     {"role": "assistant", "content": "fine thanks"}]}


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def rows_of(out: str) -> list[tuple[str, str]]:
    """(header, token text) of every shown row in the plain output."""
    blocks = re.split(r"\n\n(?=Row \d+ · )", out.split("\n\nRecipe ")[0])[1:]
    return [tuple(b.split("\n", 1)) for b in blocks]  # type: ignore[misc]


def supervised_spans(body: str) -> list[str]:
    """The text inside each ⟦ ⟧, token separators and drawn line breaks removed."""
    return [s.replace(show.SEP, "").replace(show.NEWLINE + "\n", "\n") for s in re.findall("⟦(.*?)⟧", body, re.S)]


def gathered(target: Path, model: Path, n: int, **flags) -> list[show.Shown]:
    recipe = recipes.load(None, dict(data=str(target), model=str(model), max_seq_length=256, **flags)).unwrap()
    return show.gather(recipe, {"train": str(target)}, load_tokenizer(model), n)


def test_show_prints_rows_token_by_token_with_the_completion_bracketed(capsys, tmp_path, model_dir, tokenizer):
    data = jsonl(tmp_path / "sql.jsonl", SQL)
    code, out, err = run_cli(capsys, "train", "validate", data, "--model", model_dir, "--batch-size", "1", "--show", "2")
    assert code == 0, out
    assert "Supervised tokens (what the model learns) are inside ⟦ ⟧" in out
    assert "\x1b[" not in out  # not a terminal: marks, no colour
    shown = rows_of(out)
    assert len(shown) == 2
    for i, (head, body) in enumerate(shown):
        assert head.startswith(f"Row {i + 1} · {data}:{i + 1} (train) · completions rendered with plain · ")
        assert supervised_spans(body) == [SQL[i]["completion"] + tokenizer.eos_token]
        assert body.startswith(tokenizer.bos_token + show.SEP + "table")  # masked context, token by token
        assert body.count(show.OPEN) == 1 and f"users{show.SEP}{show.NEWLINE}\n" in body
    assert out.index("Row 2") < out.index("OK: ready to train")


def test_every_assistant_turn_and_its_end_marker_are_supervised_in_chat(tmp_path, model_dir):
    [row] = gathered(jsonl(tmp_path / "chat.jsonl", [CHAT]), model_dir, 5, template="chatml")
    assert row.template == "chatml" and row.row.format == "chat"
    body = show.token_text(row, colour=False).plain
    assert supervised_spans(body) == ["hello world<|im_end|>", "fine thanks<|im_end|>"]
    # every token is shown once, in order: without the marks the text is the decoded row
    text = body.replace(show.OPEN, "").replace(show.CLOSE, "").replace(show.SEP, "").replace(show.NEWLINE + "\n", "\n")
    assert text == "".join(row.pieces) == load_tokenizer(model_dir).decode(list(row.row.tokens.ids))
    # every boundary between two tokens is drawn once: by ¦, or by the ⟦ or ⟧ that falls there
    marks = body.count(show.SEP) + body.count(show.OPEN) + body.count(show.CLOSE)
    assert marks - body.startswith(show.OPEN) - body.endswith(show.CLOSE) == len(row.row.tokens.ids) - 1


def test_each_row_names_the_template_of_its_format(capsys, tmp_path, model_dir):
    data = jsonl(tmp_path / "mixed.jsonl", [{"text": "hello world"}, {"instruction": "say hello", "output": "hello"}])
    code, out, _ = run_cli(capsys, "train", "validate", data, "--model", model_dir, "--template", "alpaca", "--show", "5")
    heads = [h for h, _ in rows_of(out)]
    assert len(heads) == 2
    assert f"{data}:1 (train) · text rendered with none (trained as-is)" in heads[0]
    assert f"{data}:2 (train) · instruction rendered with alpaca" in heads[1]
    [_, (_, instruction)] = rows_of(out)
    assert supervised_spans(instruction)[0].startswith("hello")
    assert "### Response:" in instruction.split(show.OPEN)[0].replace(show.SEP, "")


def test_a_recipe_shows_its_own_template_and_truncation(capsys, tmp_path, model_dir):
    jsonl(tmp_path / "train.jsonl", SQL)
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[model]\npath = "{model_dir}"\n[data]\npath = "{tmp_path}"\ntemplate = "alpaca"\n'
                      "[train]\nmax_seq_length = 16\nbatch_size = 1\n")
    code, out, _ = run_cli(capsys, "train", "validate", recipe, "--show", "1")
    [(head, body)] = rows_of(out)
    assert f"{tmp_path / 'train.jsonl'}:1 (train) · completions rendered with alpaca" in head
    assert re.search(r" 16 tokens, truncated from \d+, 0 supervised", head)
    assert show.OPEN not in body  # the completion was cut off: nothing to learn, and it shows


def test_ids_follow_each_token(capsys, tmp_path, model_dir, tokenizer):
    data = jsonl(tmp_path / "sql.jsonl", SQL[:1])
    code, out, _ = run_cli(capsys, "train", "validate", data, "--model", model_dir, "--show", "1", "--ids")
    [(_, body)] = rows_of(out)
    [row] = gathered(data, model_dir, 1)
    assert [int(i) for i in re.findall(r"\((\d+)\)", body)] == list(row.row.tokens.ids)
    assert re.search(r"↵\(\d+\)\n", body)  # a line break's id stays on its line


def test_bad_rows_are_skipped_and_listed_after(capsys, tmp_path, model_dir):
    data = jsonl(tmp_path / "bad.jsonl", ['{"prompt": "x"', {"nothing": 1}, *SQL[:1]])
    code, out, _ = run_cli(capsys, "train", "validate", data, "--model", model_dir, "--show", "3")
    assert code == 2
    heads = [h for h, _ in rows_of(out)]
    assert len(heads) == 1 and f"{data}:3 (train)" in heads[0]
    assert f"{data}:1: json" in out and f"{data}:2:" in out


def test_colour_on_a_terminal_marks_supervised_tokens_green_with_alternating_shades(tmp_path, model_dir):
    [row] = gathered(jsonl(tmp_path / "sql.jsonl", SQL[:1]), model_dir, 1)
    text = show.token_text(row, colour=True)
    assert show.OPEN not in text.plain and show.SEP not in text.plain
    styles = [str(span.style) for span in text.spans]
    mask = row.row.tokens.mask
    assert len(styles) == len(mask)
    for i, (style, learned) in enumerate(zip(styles, mask, strict=True)):
        assert style == (show.SUPERVISED if learned else show.MASKED)[i % 2]
    out = io.StringIO()
    show.show([row], Console(file=out, force_terminal=True, color_system="truecolor", soft_wrap=True))
    ansi = out.getvalue()
    assert "\x1b[1;32;" in ansi and show.OPEN not in ansi  # bold green, no brackets


def test_pieces_keep_sentencepiece_spaces_and_whole_characters(sp_tokenizer, tokenizer):  # noqa: F811
    ids = sp_tokenizer("hello world how are you", add_special_tokens=False)["input_ids"]
    decode = show._decoder(sp_tokenizer)
    parts = show.pieces(tuple(ids), decode)
    assert "".join(parts) == "hello world how are you"
    assert any(p.startswith(" ") for p in parts[1:])
    assert not any(decode([i]).startswith(" ") for i in ids)  # alone, a token loses its space
    accented = tokenizer("café", add_special_tokens=False)["input_ids"]
    parts = show.pieces(tuple(accented), show._decoder(tokenizer))
    assert "".join(parts).replace("\ufffd", "") == "café"


def test_show_refuses_a_negative_count_and_json(capsys, tmp_path, model_dir):
    data = jsonl(tmp_path / "sql.jsonl", SQL)
    code, _, err = run_cli(capsys, "train", "validate", data, "--model", model_dir, "--show", "-1")
    assert code == 2 and "--show -1" in one_line_error(err)
    code, out, err = run_cli(capsys, "train", "validate", data, "--model", model_dir, "--show", "2", "--json")
    assert code == 2 and "--json" in one_line_error(err) and out == ""


def test_without_a_tokenizer_show_says_so_and_validate_fails(capsys, tmp_path, model_dir):
    broken = tmp_path / "model"
    broken.mkdir()
    (broken / "config.json").write_text((model_dir / "config.json").read_text())  # no tokenizer files
    data = jsonl(tmp_path / "sql.jsonl", SQL)
    code, out, _ = run_cli(capsys, "train", "validate", data, "--model", broken, "--show", "2")
    assert code == 2
    assert "Cannot show rows: the model's tokenizer did not load" in out and "Row 1" not in out
    assert "cannot load the tokenizer" in out.replace("\n", " ")
