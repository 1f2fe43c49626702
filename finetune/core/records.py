"""Data rows: detect each row's format and normalise it into a `Sample` (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from msgspec import Struct
from returns.result import Failure, Result, Success

Format = Literal["chat", "text", "completions", "instruction"]
FORMATS: tuple[Format, ...] = ("chat", "text", "completions", "instruction")
ROLES = ("system", "user", "assistant")

# Error classes a row can fail with; reports group by these.
ErrorKind = Literal["json", "encoding", "shape", "type", "empty", "role", "template"]


class Message(Struct, frozen=True):
    role: str
    content: str


class Sample(Struct, frozen=True, kw_only=True):
    """One training example. `text` rows have no messages; `input` is Alpaca's optional context."""

    format: Format
    messages: tuple[Message, ...] = ()
    text: str = ""
    input: str = ""


class RowError(Struct, frozen=True):
    """What is wrong with one row; the shell adds the file, `line` is 1-based."""

    line: int
    kind: ErrorKind
    message: str


def detect(row: Mapping[str, Any]) -> Format | None:
    """The row's format by its keys: messages > prompt/completion > instruction/output > text."""
    if "messages" in row:
        return "chat"
    if "prompt" in row and "completion" in row:
        return "completions"
    if "instruction" in row and "output" in row:
        return "instruction"
    if "text" in row:
        return "text"
    return None


def detect_mlx(row: Mapping[str, Any]) -> Format | None:
    """The row's format among mlx-lm's, in mlx_lm.lora's order: prompt/completion > messages > text."""
    if "prompt" in row and "completion" in row:
        return "completions"
    if "messages" in row:
        return "chat"
    if "text" in row:
        return "text"
    return None


_SHAPES = "messages | text | prompt+completion | instruction+output(+input)"
_MLX_SHAPES = "messages | prompt+completion | text"


def normalise(row: Any, line: int, forced: str = "auto") -> Result[Sample, RowError]:
    """Check one parsed JSON value and turn it into a Sample, or say what is wrong with it."""
    if not isinstance(row, Mapping):
        return _fail(line, "shape", f"expected a JSON object, got {_kind(row)}")
    if _has_lone_surrogate(row):
        return _fail(line, "encoding", "a string holds a lone UTF-16 surrogate (an escaped \\ud800-\\udfff): not valid Unicode")
    fmt = detect(row) if forced == "auto" else detect_mlx(row) if forced == "mlx" else forced
    if fmt is None:
        keys = ", ".join(sorted(map(str, row))) or "none"
        if forced == "mlx":
            hint = "; instruction rows need --format auto or instruction" if detect(row) == "instruction" else ""
            return _fail(line, "shape", f"not one of mlx-lm's row shapes (keys: {keys}); expected {_MLX_SHAPES}{hint}")
        return _fail(line, "shape", f"unknown row shape (keys: {keys}); expected {_SHAPES}")
    match fmt:
        case "chat":
            return _chat(row, line)
        case "text":
            return _field(row, line, "text", fmt).map(lambda t: Sample(format="text", text=t))
        case "completions":
            return _field(row, line, "prompt", fmt, allow_empty=True).bind(
                lambda p: _field(row, line, "completion", fmt).map(
                    lambda c: Sample(format="completions", messages=_pair(p, c))
                )
            )
        case "instruction":
            return _instruction(row, line)
    raise AssertionError(f"unknown format {fmt!r}")


def _pair(prompt: str, answer: str) -> tuple[Message, ...]:
    return (Message("user", prompt), Message("assistant", answer))


def _instruction(row: Mapping[str, Any], line: int) -> Result[Sample, RowError]:
    if "input" in row and not isinstance(row["input"], str):
        return _fail(line, "type", f"field 'input' must be a string, got {_kind(row['input'])}")
    context = row.get("input", "")
    return _field(row, line, "instruction", "instruction").bind(
        lambda ins: _field(row, line, "output", "instruction").map(
            lambda out: Sample(format="instruction", messages=_pair(ins, out), input=context)
        )
    )


def _field(
    row: Mapping[str, Any], line: int, name: str, fmt: str, allow_empty: bool = False
) -> Result[str, RowError]:
    if name not in row:
        return _fail(line, "shape", f"{fmt} row needs field '{name}'")
    value = row[name]
    if not isinstance(value, str):
        return _fail(line, "type", f"field '{name}' must be a string, got {_kind(value)}")
    if not allow_empty and not value.strip():
        return _fail(line, "empty", f"field '{name}' is empty")
    return Success(value)


def _chat(row: Mapping[str, Any], line: int) -> Result[Sample, RowError]:
    if "messages" not in row:
        return _fail(line, "shape", "chat row needs field 'messages'")
    messages = row["messages"]
    if not isinstance(messages, list):
        return _fail(line, "type", f"'messages' must be a list, got {_kind(messages)}")
    if not messages:
        return _fail(line, "empty", "'messages' is empty")
    out: list[Message] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, Mapping):
            return _fail(line, "type", f"{where} must be an object, got {_kind(m)}")
        role, content = m.get("role"), _content(m.get("content"))
        if not isinstance(role, str):
            return _fail(line, "type", f"{where}.role must be a string, got {_kind(role)}")
        if role not in ROLES:
            return _fail(line, "role", f"{where}.role {role!r} is not one of {', '.join(ROLES)}")
        if role == "system" and i != 0:
            return _fail(line, "role", f"{where}: a system message may only come first")
        if not isinstance(content, str):
            kind = _kind(m.get("content")) if "content" in m else "nothing"
            return _fail(line, "type", f"{where}.content must be a string, got {kind}")
        if not content.strip():
            return _fail(line, "empty", f"{where}.content is empty")
        out.append(Message(role, content))
    if out[-1].role == "system":
        return _fail(line, "role", "a conversation needs a user or assistant turn after 'system'")
    return Success(Sample(format="chat", messages=tuple(out)))


def _content(value: Any) -> Any:
    """Accept OpenAI-style content parts `[{"type": "text", "text": ...}]` by joining the text."""
    if isinstance(value, list) and value and all(
        isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in value
    ):
        return "".join(p["text"] for p in value)
    return value


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, Mapping):
        return any(_has_lone_surrogate(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


def _kind(value: Any) -> str:
    return {
        type(None): "null", bool: "boolean", int: "number", float: "number", str: "string",
        list: "array", dict: "object",
    }.get(type(value), type(value).__name__)


def _fail(line: int, kind: ErrorKind, message: str) -> Result[Sample, RowError]:
    return Failure(RowError(line, kind, message))
