"""A small TOML writer for recipe-shaped tables: scalars and arrays at the top, then sub-tables."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def dumps(table: Mapping[str, Any]) -> str:
    """Encode nested tables of str/int/float/bool/list values; `tomllib.loads` inverts it."""
    lines = _body(table, prefix="")
    return "\n".join(lines).strip() + "\n"


def _body(table: Mapping[str, Any], prefix: str) -> list[str]:
    scalars = [(k, v) for k, v in table.items() if not isinstance(v, Mapping)]
    tables = [(k, v) for k, v in table.items() if isinstance(v, Mapping)]
    lines = [f"{_key(k)} = {_value(v)}" for k, v in scalars]
    for key, sub in tables:
        name = f"{prefix}{_key(key)}"
        lines += ["", f"[{name}]", *_body(sub, prefix=f"{name}.")]
    return lines


def _key(key: str) -> str:
    bare = key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key)
    return key if bare else _string(key)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
        text = repr(v)
        return text if any(c in text for c in ".en") else f"{text}.0"
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _string(s: str) -> str:
    out = ['"']
    for ch in s:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04x}")
        elif 0xD800 <= code <= 0xDFFF:
            raise ValueError("TOML strings cannot hold lone surrogates")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)
