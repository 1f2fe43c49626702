"""Command-line flags derived from the config Structs: one declaration for fields, flags and help.

A field's flag is `--FIELD` (`--lora-FIELD` in `[lora]`) unless its `Meta(extra={"flag": ...})`
names another; its help is the field's `Meta(description=...)`. `ft train start/quick` and
`finetune.train(**overrides)` take the same names (`lora_rank`, `batch_size`, `quantize_bits`, ...).
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

from finetune.core.config import Recipe


class Flag(Struct, frozen=True):
    """One recipe field as a flag: `name` is the Python keyword (`lora_rank`), `path` the field's."""

    name: str
    path: tuple[str, ...]
    kind: Any  # the field's type without bounds, as a CLI parser wants it
    help: str
    aliases: tuple[str, ...] = ()

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")


def _meta(hint: Any) -> tuple[Any, Meta | None]:
    """(bare type, the last Meta) of an `Annotated[...]` field type."""
    meta = None
    while typing.get_origin(hint) is Annotated:
        base, *extras = typing.get_args(hint)
        meta = next((m for m in reversed(extras) if isinstance(m, Meta)), meta)
        hint = base
    return hint, meta


def _cli_type(hint: Any) -> Any:
    if typing.get_origin(hint) is tuple:
        return str  # comma-separated on the command line
    return hint


def _walk(struct: type, prefix: tuple[str, ...]) -> list[Flag]:
    hints = typing.get_type_hints(struct, include_extras=True)
    out: list[Flag] = []
    for field in msgspec.structs.fields(struct):
        hint, meta = _meta(hints[field.name])
        path = (*prefix, field.name)
        if isinstance(hint, type) and issubclass(hint, Struct):
            out += _walk(hint, path)
            continue
        extra = (meta.extra if meta else None) or {}
        default = f"lora_{field.name}" if prefix == ("lora",) else field.name
        name = extra.get("flag", default).replace("-", "_")
        aliases = tuple(a.replace("-", "_") for a in extra.get("aliases", ()))
        help_text = (meta.description if meta else None) or ""
        out.append(Flag(name, path, _cli_type(hint), help_text, aliases))
    return out


FLAGS: tuple[Flag, ...] = tuple(_walk(Recipe, ()))
BY_NAME: dict[str, Flag] = {f.name: f for f in FLAGS}
assert len(BY_NAME) == len(FLAGS), "two recipe fields map to one flag"


def layer(values: Mapping[str, Any]) -> dict[str, Any]:
    """`{flag name: value}` (None = not given) -> a nested raw recipe table.

    Unknown names raise KeyError (a programmer's error: the CLI only passes known flags; the
    Python API checks names first). Comma-separated strings become lists for tuple fields.
    """
    out: dict[str, Any] = {}
    for name, value in values.items():
        if value is None:
            continue
        flag = BY_NAME[name]
        if flag.kind is str and isinstance(value, str) and _is_tuple(flag.path):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, tuple):
            value = list(value)
        *parents, leaf = flag.path
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _is_tuple(path: tuple[str, ...]) -> bool:
    struct: Any = Recipe
    for part in path:
        hints = typing.get_type_hints(struct, include_extras=True)
        struct, _ = _meta(hints[part])
    return typing.get_origin(struct) is tuple
