"""Recipes: layered raw tables (profile < file < flags) decoded through one path into a `Recipe`."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
from returns.result import Failure, Result, Success

from finetune.core.config import Recipe

Raw = Mapping[str, Any]
Layer = tuple[str, Raw]  # (source label, raw table), e.g. ("recipes/sql.toml", {...})

# Defaults a profile brings; anything the recipe or the flags say wins.
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "none": {},
    "chat": {
        "data": {"format": "chat", "template": "auto", "supervise": "assistant"},
        "lora": {"rank": 16, "scale": 20.0},
        "train": {"learning_rate": 1e-4, "warmup": 20},
    },
    "instruction": {
        "data": {"template": "alpaca", "supervise": "assistant"},
        "lora": {"rank": 8, "scale": 20.0},
        "train": {"learning_rate": 2e-4, "warmup": 10},
    },
    "code": {
        "data": {"template": "auto", "supervise": "last-turn-only"},
        "lora": {"rank": 16, "scale": 10.0},
        "train": {"learning_rate": 5e-5, "warmup": 20},
    },
}

# Pairs where saying one in a higher layer withdraws the other from the layers below.
_EXCLUSIVE = {("train", "iters"): ("train", "epochs"), ("lora", "alpha"): ("lora", "scale")}
_EXCLUSIVE.update({b: a for a, b in list(_EXCLUSIVE.items())})


def merge(lower: Raw, upper: Raw) -> dict[str, Any]:
    """Deep-merge `upper` over `lower` (new dicts; inputs untouched)."""
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in lower.items()}
    for key, value in upper.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            section = dict(out[key])
            for leaf in value:
                other = _EXCLUSIVE.get((key, leaf))
                if other and other[1] not in value:
                    section.pop(other[1], None)
            if key == "lora" and "rank" in value and "scale" not in value and section.get("alpha"):
                section.pop("scale", None)  # scale follows alpha / rank: derive it again below
            out[key] = merge(section, value)
        else:
            out[key] = value
    return out


def _derive(raw: dict[str, Any]) -> dict[str, Any]:
    """Fill fields implied by others: scale from alpha, iters withdrawn when epochs is given."""
    out = dict(raw)
    lora = out.get("lora")
    if isinstance(lora, Mapping) and "alpha" in lora and "scale" not in lora:
        alpha, rank = lora["alpha"], lora.get("rank", 8)
        if _is_number(alpha) and _is_number(rank) and alpha > 0 and rank > 0:
            out["lora"] = {**lora, "scale": alpha / rank}
    train = out.get("train")
    if isinstance(train, Mapping) and train.get("epochs") and "iters" not in train:
        out["train"] = {**train, "iters": 0}
    return out


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def resolve(layers: Sequence[Layer]) -> Result[Recipe, str]:
    """Merge layers (lowest first) over the chosen profile's defaults and decode them."""
    merged: dict[str, Any] = {}
    for _, raw in layers:
        if not isinstance(raw, Mapping):
            return Failure(f"{_}: expected a table of settings, got {type(raw).__name__}")
        merged = merge(merged, raw)
    profile = merged.get("profile", "none")
    if isinstance(profile, str) and profile in PROFILES:
        merged = merge(PROFILES[profile], merged)
    return decode(_derive(merged), layers)


def decode(raw: Raw, layers: Sequence[Layer] = ()) -> Result[Recipe, str]:
    """`msgspec.convert` with an error that names the field, its value, and who set it."""
    try:
        return Success(msgspec.convert(raw, Recipe))
    except msgspec.ValidationError as err:
        return Failure(explain(str(err), raw, layers))


def explain(message: str, raw: Raw, layers: Sequence[Layer] = ()) -> str:
    """Rewrite msgspec's `Expected ... - at `$.a.b`` as `SOURCE: $.a.b: expected ..., got X`."""
    m = re.match(r"^(.*?)(?: - at `(\$[^`]*)`)?$", message, re.S)
    what, path = (m.group(1), m.group(2) or "$") if m else (message, "$")
    what = what.replace("`", "")
    unknown = re.match(r"Object contains unknown field (\S+)", what)
    if unknown:
        field = unknown.group(1)
        path = f"{path}.{field}"
        what = f"unknown field{_suggest(field, path)}"
    else:
        what = what[:1].lower() + what[1:]
        field = what.split(" ", 1)[0]
        field_rule = field in _field_names(path) and " " in what  # a rule about one field
        if field_rule:
            path, what = f"{path}.{field}", what.split(" ", 1)[1]
        found, value = _lookup(raw, path)
        found = found and not (field_rule and "got" in what)
        if what.startswith("invalid enum value"):
            choices = _choices(path)
            what = f"{value!r} is not one of {', '.join(map(repr, choices))}" if choices else what
        elif found and "got" not in what:
            what += f", got {value!r}"
        elif found and not isinstance(value, Mapping | list):
            what += f" ({value!r})"
    source = _source(path, layers)
    return f"{source}{path}: {what}"


def _choices(path: str) -> tuple[Any, ...]:
    """The allowed values of a Literal-typed field at `path`, if it is one."""
    import typing

    struct: Any = Recipe
    field_type: Any = None
    for part in path.split(".")[1:]:
        fields = {f.name: f.type for f in msgspec.structs.fields(struct)} if isinstance(struct, type) else {}
        field_type = fields.get(part)
        struct = field_type
    while typing.get_origin(field_type) is typing.Annotated:
        field_type = typing.get_args(field_type)[0]
    return typing.get_args(field_type) if typing.get_origin(field_type) is typing.Literal else ()


def _field_names(path: str) -> list[str]:
    """The field names of the Struct at `path` (`$`, `$.train`, ...); [] when it is no Struct."""
    struct: Any = Recipe
    for part in path.split(".")[1:]:
        struct = next((f.type for f in msgspec.structs.fields(struct) if f.name == part), None)
        if struct is None or not isinstance(struct, type):
            return []
    return [f.name for f in msgspec.structs.fields(struct)]


def _suggest(field: str, path: str) -> str:
    names = _field_names(path.rsplit(".", 1)[0])
    if not names:
        return ""
    close = difflib.get_close_matches(field, names, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f" ({hint}expected one of: {', '.join(names)})"


def _lookup(raw: Raw, path: str) -> tuple[bool, Any]:
    node: Any = raw
    for part in path.split(".")[1:]:
        m = re.match(r"^(\w+)\[(\d+)\]$", part)
        key, index = (m.group(1), int(m.group(2))) if m else (part, None)
        if not isinstance(node, Mapping) or key not in node:
            return False, None
        node = node[key]
        if index is not None:
            if not isinstance(node, list | tuple) or index >= len(node):
                return False, None
            node = node[index]
    return True, node


def _source(path: str, layers: Sequence[Layer]) -> str:
    """The highest layer that set `path` (or its section), as a `label: ` prefix."""
    for label, raw in reversed(layers):
        found, _ = _lookup(raw, path)
        if found:
            return f"{label}: "
    section = ".".join(path.split(".")[:2])
    for label, raw in reversed(layers):
        found, _ = _lookup(raw, section)
        if found and section != "$":
            return f"{label}: "
    return f"{layers[-1][0]}: " if layers else ""


def to_builtins(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain tables (tuples become lists), ready for TOML."""
    return msgspec.json.decode(msgspec.json.encode(recipe))


DEFAULT_MAX_SEQ_LENGTH = 2048


def against_model(recipe: Recipe, context_length: int | None) -> Recipe:
    """Resolve the defaults that depend on the model: `max_seq_length = 0` becomes its context
    (at most 2048; 2048 when the model is unknown). Explicit values are kept for validation to judge."""
    if recipe.train.max_seq_length:
        return recipe
    length = min(context_length or DEFAULT_MAX_SEQ_LENGTH, DEFAULT_MAX_SEQ_LENGTH)
    train = msgspec.structs.replace(recipe.train, max_seq_length=length)
    return msgspec.structs.replace(recipe, train=train)
