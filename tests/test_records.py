"""Data rows through the real reader: detection, normalisation and every error class, with lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.core.prepare import normalise_rows
from finetune.core.records import Message, RowError, Sample
from finetune.files.datasets import read_rows


def write_jsonl(path: Path, rows: list) -> Path:
    """One JSON value per line; `str` items are written verbatim (for broken lines)."""
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def load(path: Path, forced: str = "auto") -> tuple[list[tuple[int, Sample]], list[RowError]]:
    """read_rows then normalise_rows, with reader and row errors together, by line."""
    rows, read_errors = read_rows(path)
    good, bad = normalise_rows(rows, forced)
    return good, sorted([*read_errors, *bad], key=lambda e: e.line)


def one(path: Path, forced: str = "auto") -> Sample:
    good, bad = load(path, forced)
    assert bad == []
    assert len(good) == 1
    return good[0][1]


def one_error(tmp_path: Path, row, forced: str = "auto") -> RowError:
    """A file with two good rows around `row`: the only error is on line 2."""
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "first"}, row, {"text": "last"}])
    good, bad = load(path, forced)
    assert [line for line, _ in good] == [1, 3]
    assert len(bad) == 1, bad
    assert bad[0].line == 2
    return bad[0]


# --- detection and normalisation -------------------------------------------------------------


def test_chat_row(tmp_path):
    row = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
        ]
    }
    sample = one(write_jsonl(tmp_path / "c.jsonl", [row]))
    assert sample == Sample(
        format="chat",
        messages=(
            Message("system", "be brief"),
            Message("user", "hi"),
            Message("assistant", "hello"),
        ),
    )


def test_chat_row_keeps_extra_keys_out(tmp_path):
    row = {
        "messages": [
            {"role": "user", "content": "q", "name": "x"},
            {"role": "assistant", "content": "a"},
        ],
        "id": 7,
    }
    sample = one(write_jsonl(tmp_path / "c.jsonl", [row]))
    assert sample.messages == (Message("user", "q"), Message("assistant", "a"))


def test_text_row(tmp_path):
    sample = one(write_jsonl(tmp_path / "t.jsonl", [{"text": "SELECT 1"}]))
    assert sample == Sample(format="text", text="SELECT 1")


def test_completions_row(tmp_path):
    sample = one(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q: one?\nA: ", "completion": "1"}]))
    assert sample == Sample(
        format="completions",
        messages=(
            Message("user", "Q: one?\nA: "),
            Message("assistant", "1"),
        ),
    )


def test_completions_prompt_may_be_empty(tmp_path):
    sample = one(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "", "completion": "all of it"}]))
    assert sample.messages == (Message("user", ""), Message("assistant", "all of it"))


def test_instruction_row_without_input(tmp_path):
    sample = one(
        write_jsonl(tmp_path / "i.jsonl", [{"instruction": "Add 2 and 2.", "output": "4"}])
    )
    assert sample == Sample(
        format="instruction",
        messages=(
            Message("user", "Add 2 and 2."),
            Message("assistant", "4"),
        ),
        input="",
    )


def test_instruction_row_with_input(tmp_path):
    row = {"instruction": "Translate.", "input": "bonjour", "output": "hello"}
    sample = one(write_jsonl(tmp_path / "i.jsonl", [row]))
    assert sample == Sample(
        format="instruction",
        messages=(
            Message("user", "Translate."),
            Message("assistant", "hello"),
        ),
        input="bonjour",
    )


def test_openai_content_parts_are_joined(tmp_path):
    row = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "there"}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "Hi!"}]},
        ]
    }
    sample = one(write_jsonl(tmp_path / "o.jsonl", [row]))
    assert sample.messages == (Message("user", "Hello, there"), Message("assistant", "Hi!"))


def test_content_parts_with_an_image_are_a_type_error(tmp_path):
    row = {
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
            {"role": "assistant", "content": "ok"},
        ]
    }
    err = one_error(tmp_path, row)
    assert (err.kind, err.message) == ("type", "messages[0].content must be a string, got array")


def test_detection_priority(tmp_path):
    rows = [
        {
            "messages": [{"role": "user", "content": "m"}],
            "text": "t",
            "prompt": "p",
            "completion": "c",
        },
        {"prompt": "p", "completion": "c", "instruction": "i", "output": "o", "text": "t"},
        {"instruction": "i", "output": "o", "text": "t"},
        {"text": "t", "prompt": "only a prompt"},
    ]
    good, bad = load(write_jsonl(tmp_path / "d.jsonl", rows))
    assert bad == []
    assert [(line, s.format) for line, s in good] == [
        (1, "chat"),
        (2, "completions"),
        (3, "instruction"),
        (4, "text"),
    ]


def test_mixed_formats_in_one_file(tmp_path):
    rows = [
        {"text": "plain text"},
        {"prompt": "p", "completion": "c"},
        {"instruction": "i", "output": "o"},
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
        {"text": "more text"},
    ]
    good, bad = load(write_jsonl(tmp_path / "mixed.jsonl", rows))
    assert bad == []
    assert [(line, s.format) for line, s in good] == [
        (1, "text"),
        (2, "completions"),
        (3, "instruction"),
        (4, "chat"),
        (5, "text"),
    ]


def test_forced_format_reads_every_row_as_it(tmp_path):
    rows = [
        {"text": "t", "prompt": "p", "completion": "c"},  # auto: completions
        {"text": "u"},
    ]
    path = write_jsonl(tmp_path / "f.jsonl", rows)
    good, bad = load(path, forced="text")
    assert bad == []
    assert [(line, s) for line, s in good] == [
        (1, Sample(format="text", text="t")),
        (2, Sample(format="text", text="u")),
    ]
    good, bad = load(path)
    assert [s.format for _, s in good] == ["completions", "text"]


def test_forced_format_rejects_rows_of_another_shape(tmp_path):
    rows = [{"prompt": "p", "completion": "c"}, {"text": "no prompt here"}]
    good, bad = load(write_jsonl(tmp_path / "f.jsonl", rows), forced="completions")
    assert [line for line, _ in good] == [1]
    assert bad == [RowError(2, "shape", "completions row needs field 'prompt'")]


def test_forced_instruction_needs_output(tmp_path):
    rows = [{"instruction": "do it", "output": "done"}, {"instruction": "do it", "text": "t"}]
    good, bad = load(write_jsonl(tmp_path / "f.jsonl", rows), forced="instruction")
    assert [line for line, _ in good] == [1]
    assert bad == [RowError(2, "shape", "instruction row needs field 'output'")]


def test_forced_chat_on_a_row_without_messages_is_a_shape_error(tmp_path):
    """Like the other forced formats: a missing field is a shape error naming it (not 'got null')."""
    path = write_jsonl(tmp_path / "f.jsonl", [{"text": "no messages"}])
    good, bad = load(path, forced="chat")
    assert good == []
    assert len(bad) == 1
    assert bad[0].line == 1
    assert bad[0].kind == "shape", bad[0]
    assert "messages" in bad[0].message and "null" not in bad[0].message


# --- error classes, each with its line -------------------------------------------------------


def test_bad_json_line(tmp_path):
    err = one_error(tmp_path, '{"text": "unterminated}')
    assert err.kind == "json"
    assert err.message.startswith("bad JSON: ")


def test_trailing_garbage_is_bad_json(tmp_path):
    err = one_error(tmp_path, '{"text": "a"} extra')
    assert err.kind == "json"
    assert "Extra data" in err.message


def test_non_utf8_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n{"text": "also ok"}\n')
    good, bad = load(path)
    assert [line for line, _ in good] == [1, 3]
    assert bad == [RowError(2, "encoding", "not valid UTF-8 (byte 14 of the line)")]


def test_unknown_shape(tmp_path):
    err = one_error(tmp_path, {"question": "q", "answer": "a"})
    assert err.kind == "shape"
    assert "unknown row shape (keys: answer, question)" in err.message


def test_not_an_object(tmp_path):
    err = one_error(tmp_path, ["text", "a list"])
    assert (err.kind, err.message) == ("shape", "expected a JSON object, got array")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"messages": [{"role": "user", "content": 5}]},
            "messages[0].content must be a string, got number",
        ),
        (
            {"messages": [{"role": "user", "content": None}]},
            "messages[0].content must be a string, got null",
        ),
        ({"messages": [{"role": "user"}]}, "messages[0].content must be a string, got nothing"),
        ({"messages": {"role": "user", "content": "x"}}, "'messages' must be a list, got object"),
        ({"messages": "hello"}, "'messages' must be a list, got string"),
        (
            {"messages": [{"role": 1, "content": "x"}]},
            "messages[0].role must be a string, got number",
        ),
        ({"messages": [{"content": "x"}]}, "messages[0].role must be a string, got null"),
        ({"messages": ["hi"]}, "messages[0] must be an object, got string"),
        ({"text": 3.5}, "field 'text' must be a string, got number"),
        ({"prompt": "p", "completion": ["c"]}, "field 'completion' must be a string, got array"),
        ({"prompt": None, "completion": "c"}, "field 'prompt' must be a string, got null"),
        (
            {"instruction": "i", "input": 1, "output": "o"},
            "field 'input' must be a string, got number",
        ),
        ({"instruction": True, "output": "o"}, "field 'instruction' must be a string, got boolean"),
    ],
)
def test_wrong_types(tmp_path, row, message):
    err = one_error(tmp_path, row)
    assert (err.kind, err.message) == ("type", message)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"messages": []}, "'messages' is empty"),
        ({"messages": [{"role": "user", "content": "  \n"}]}, "messages[0].content is empty"),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
            "messages[1].content is empty",
        ),
        ({"text": ""}, "field 'text' is empty"),
        ({"prompt": "p", "completion": " "}, "field 'completion' is empty"),
        ({"instruction": "", "output": "o"}, "field 'instruction' is empty"),
        ({"instruction": "i", "output": "\t"}, "field 'output' is empty"),
    ],
)
def test_empty_content(tmp_path, row, message):
    err = one_error(tmp_path, row)
    assert (err.kind, err.message) == ("empty", message)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"messages": [{"role": "bot", "content": "x"}]},
            "messages[0].role 'bot' is not one of system, user, assistant",
        ),
        (
            {"messages": [{"role": "User", "content": "x"}]},
            "messages[0].role 'User' is not one of system, user, assistant",
        ),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}]},
            "messages[1]: a system message may only come first",
        ),
        (
            {"messages": [{"role": "system", "content": "only a system prompt"}]},
            "a conversation needs a user or assistant turn after 'system'",
        ),
    ],
)
def test_roles(tmp_path, row, message):
    err = one_error(tmp_path, row)
    assert (err.kind, err.message) == ("role", message)


def test_lone_surrogate_is_a_row_error(tmp_path):
    """`\\ud800` is valid JSON syntax but no tokenizer can encode it: the row must be reported."""
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"text": "ok"}\n{"text": "bad \\ud800 half"}\n{"text": "ok"}\n', encoding="utf-8"
    )
    good, bad = load(path)
    assert [line for line, _ in good] == [1, 3]
    assert [(e.line, e.kind) for e in bad] == [(2, "encoding")]


def test_every_bad_row_is_reported_with_its_own_line(tmp_path):
    rows = [
        {"text": "good"},
        "not json",
        {"messages": [{"role": "wizard", "content": "x"}]},
        {"text": "good again"},
        {"text": ""},
        {"foo": 1},
    ]
    good, bad = load(write_jsonl(tmp_path / "d.jsonl", rows))
    assert [line for line, _ in good] == [1, 4]
    assert [(e.line, e.kind) for e in bad] == [(2, "json"), (3, "role"), (5, "empty"), (6, "shape")]


# --- file-level details ----------------------------------------------------------------------


def test_blank_lines_are_skipped_and_lines_still_counted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('\n{"text": "a"}\n\n   \n\t\n{"text": "b"}\n\n', encoding="utf-8")
    good, bad = load(path)
    assert bad == []
    assert [(line, s.text) for line, s in good] == [(2, "a"), (6, "b")]


def test_bom_at_the_start_of_a_jsonl_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n{"text": "b"}\n')
    good, bad = load(path)
    assert bad == []
    assert [(line, s.text) for line, s in good] == [(1, "a"), (2, "b")]


def test_crlf_line_endings(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a"}\r\n{"text": "b"}\r\n')
    good, bad = load(path)
    assert bad == []
    assert [(line, s.text) for line, s in good] == [(1, "a"), (2, "b")]


def test_no_trailing_newline(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}', encoding="utf-8")
    good, bad = load(path)
    assert bad == []
    assert [line for line, _ in good] == [1, 2]


def test_json_array_rows_carry_the_line_they_start_on(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(
        "[\n"
        '  {"text": "a"},\n'
        '  {"prompt": "p",\n'
        '   "completion": "c"},\n'
        "\n"
        '  {"instruction": "i", "output": "o"}, {"text": "same line"}\n'
        "]\n",
        encoding="utf-8",
    )
    good, bad = load(path)
    assert bad == []
    assert [(line, s.format) for line, s in good] == [
        (2, "text"),
        (3, "completions"),
        (6, "instruction"),
        (6, "text"),
    ]


def test_json_array_with_bad_rows_reports_their_lines(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n{"text": "a"},\n{"text": 1},\n{"messages": []}\n]', encoding="utf-8")
    good, bad = load(path)
    assert [line for line, _ in good] == [2]
    assert [(e.line, e.kind) for e in bad] == [(3, "type"), (4, "empty")]


def test_json_array_syntax_error_mid_array(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(
        '[\n{"text": "a"},\n{"text": "b"},\n{"text": oops},\n{"text": "d"}\n]', encoding="utf-8"
    )
    good, bad = load(path)
    assert [(line, s.text) for line, s in good] == [(2, "a"), (3, "b")]
    assert len(bad) == 1
    assert (bad[0].line, bad[0].kind) == (4, "json")
    assert "rows after it were not read" in bad[0].message


def test_json_array_missing_comma(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"text": "a"}\n {"text": "b"}]', encoding="utf-8")
    good, bad = load(path)
    assert [line for line, _ in good] == [1]
    assert bad == [RowError(2, "json", "bad JSON: expected ',' or ']' between rows")]


def test_json_file_must_be_an_array(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('\n\n{"text": "a"}', encoding="utf-8")
    good, bad = load(path)
    assert good == []
    assert bad == [RowError(3, "json", "a .json dataset must be an array of rows")]


def test_json_array_with_bom_and_empty_array(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b'\xef\xbb\xbf[{"text": "a"}]')
    good, bad = load(path)
    assert bad == []
    assert [(line, s.text) for line, s in good] == [(1, "a")]
    path.write_text("[ ]\n", encoding="utf-8")
    assert load(path) == ([], [])


def test_json_array_not_utf8(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b'[\n{"text": "a"},\n{"text": "\xff"}\n]')
    good, bad = load(path)
    assert good == []
    assert [(e.line, e.kind) for e in bad] == [(3, "encoding")]
