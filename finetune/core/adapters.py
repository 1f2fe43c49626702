"""Adapter files in mlx-lm's format: key names, `adapter_config.json`, shape checks (pure)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from msgspec import Struct
from returns.result import Failure, Result, Success

from finetune.core import architectures
from finetune.core.quantization import parse_block

# Where each family's blocks live in our module paths and in mlx-lm's adapter files (our GPT-2
# keeps HF's `transformer.` prefix; mlx-lm's GPT-2 calls the same module `model.`).
_RENAMES = {
    a.family: (a.blocks + ".", a.adapter_blocks + ".") for a in architectures.FAMILIES.values()
    if a.blocks != a.adapter_blocks
}
_BLOCK = re.compile(
    rf"^({'|'.join(re.escape(a.blocks) for a in architectures.FAMILIES.values())})\.(\d+)\.(.+)$"
)

_ANY_BLOCK = re.compile(r"^([A-Za-z_][\w.]*?)\.(\d+)\.(.+)$")
Array = Any  # an engine's array (MLX, NumPy, torch): only names and shapes are read here
# Every linear of one block (which leaf names are ambiguous in PEFT's target_modules).
BLOCK_LINEARS = {a.family: tuple(path for path, _, _ in a.linears) for a in architectures.FAMILIES.values()}


class AdapterSpec(Struct, frozen=True, kw_only=True):
    rank: int
    scale: float
    dropout: float = 0.0
    keys: tuple[str, ...]
    num_layers: int = -1
    model: str = ""
    fine_tune_type: str = "lora"
    # The quantized base it was trained on (quantization.record), None for a float or unknown base.
    base_quantization: dict[str, Any] | None = None


def to_file_keys(params: Mapping[str, Array], model_type: str) -> dict[str, Array]:
    """Our module paths -> the names mlx-lm gives the same tensors."""
    ours, theirs = _RENAMES.get(model_type, ("", ""))
    return {(theirs + k[len(ours):] if ours and k.startswith(ours) else k): v for k, v in params.items()}


def from_file_keys(params: Mapping[str, Array], model_type: str) -> dict[str, Array]:
    """mlx-lm's tensor names -> our module paths (inverse of `to_file_keys`)."""
    ours, theirs = _RENAMES.get(model_type, ("", ""))
    return {(ours + k[len(theirs):] if ours and k.startswith(theirs) else k): v for k, v in params.items()}


def config_json(spec: AdapterSpec, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`adapter_config.json` as mlx-lm writes and reads it (keys always explicit)."""
    return {
        "fine_tune_type": spec.fine_tune_type,
        "num_layers": spec.num_layers,
        "lora_parameters": {
            "rank": spec.rank, "scale": spec.scale, "dropout": spec.dropout, "keys": list(spec.keys),
        },
        "model": spec.model,
        **({"base_quantization": spec.base_quantization} if spec.base_quantization else {}),
        **(dict(extra) if extra else {}),
    }


FULL_REFUSED = ("is a full fine-tune (fine_tune_type 'full'): trained weights, not LoRA factors, so there is no "
                "LoRA, PEFT or GGUF-adapter form of it; use its model/ folder (a HuggingFace model) or "
                "`ft fuse BASE --adapter RUN --output DIR`")


def parse_config(raw: Any, source: str, full: bool = False) -> Result[AdapterSpec, str]:
    """Read an mlx-lm `adapter_config.json` value; every problem names the field.

    `full`: the reader loads trained weights, so a full fine-tune (mlx-lm's `fine_tune_type:
    "full"`: the trained blocks' weights) is read too; elsewhere it is refused in one line.
    """
    if not isinstance(raw, Mapping):
        return Failure(f"{source}: expected a JSON object")
    kind = raw.get("fine_tune_type", "lora")
    if kind == "full" and not full:
        return Failure(f"{source} {FULL_REFUSED}")
    if kind not in ("lora", "dora", "full"):
        return Failure(f"{source}: fine_tune_type {kind!r} is not an adapter; expected 'lora', 'dora' or 'full'")
    lp = raw.get("lora_parameters")
    if kind == "full" and lp is None:  # mlx-lm writes them, unused, for full runs too
        lp = {"rank": 8, "scale": 20.0}
    if not isinstance(lp, Mapping):
        return Failure(f"{source}: missing 'lora_parameters'")
    rank, scale, keys = lp.get("rank"), lp.get("scale"), lp.get("keys")
    if not isinstance(rank, int) or rank < 1:
        return Failure(f"{source}: lora_parameters.rank must be an integer >= 1, got {rank!r}")
    if not isinstance(scale, int | float):
        return Failure(f"{source}: lora_parameters.scale must be a number, got {scale!r}")
    if keys is not None and not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        return Failure(f"{source}: lora_parameters.keys must be a list of module paths")
    num_layers = raw.get("num_layers", -1)
    if not isinstance(num_layers, int):
        return Failure(f"{source}: num_layers must be an integer, got {num_layers!r}")
    base = raw.get("base_quantization")
    if base is not None and isinstance(checked := parse_block(base, f"{source}: base_quantization"), Failure):
        return checked
    return Success(AdapterSpec(
        rank=rank, scale=float(scale), dropout=float(lp.get("dropout", 0.0) or 0.0),
        keys=tuple(keys or ()), num_layers=num_layers, model=str(raw.get("model", "")), fine_tune_type=kind,
        base_quantization=dict(base) if base is not None else None,
    ))


def check_shapes(
    params: Mapping[str, Array],
    expected: Mapping[str, tuple[int, int]],
    rank: int,
    source: str,
    names: Mapping[str, str] | None = None,
) -> Result[None, str]:
    """Every `<path>.lora_a` is (in, r), `.lora_b` (r, out) and a DoRA `.m` (out,) for a linear the model has.

    `names`: how the file calls each tensor (messages name the file's tensor, not our path).
    PEFT stores the transposes, so its shapes are compared (and reported) transposed.
    """
    def shown(name: str) -> str:
        return names.get(name, name) if names else name

    def as_stored(shape: tuple[int, ...], name: str) -> tuple[int, ...]:
        return shape[::-1] if shown(name).endswith(".weight") else shape

    for name in sorted(params):
        path, _, leaf = name.rpartition(".")
        if leaf not in ("lora_a", "lora_b", "m"):
            return Failure(f"{source}: {shown(name)} is not a LoRA tensor (expected names ending in .lora_a/.lora_b, or DoRA's .m)")
        if path not in expected:
            return Failure(f"{source}: {shown(name)} names a layer this model does not have")
        fan_in, fan_out = expected[path]
        want = {"lora_a": (fan_in, rank), "lora_b": (rank, fan_out), "m": (fan_out,)}[leaf]
        got = tuple(params[name].shape)
        if got != want:
            return Failure(f"{source}: {shown(name)} has shape {as_stored(got, name)}, the model needs {as_stored(want, name)}")
        twin = f"{path}.{'lora_b' if leaf == 'lora_a' else 'lora_a'}"  # `.m` needs its `.lora_a`
        if twin not in params:
            return Failure(f"{source}: {shown(name)} has no matching {shown(twin)}")
    dora = {n.rpartition(".")[0] for n in params if n.endswith(".m")}
    plain = sorted({n.rpartition(".")[0] for n in params} - dora)
    if dora and plain:
        return Failure(f"{source}: {shown(plain[0] + '.lora_a')} has no DoRA magnitude {shown(plain[0] + '.m')} while other layers have one")
    return Success(None)


def file_kind(names: Sequence[str]) -> str:
    """The naming family an mlx-lm adapter file was written for: `gpt2` (`model.h.`) or `llama`."""
    for theirs_family, (_, theirs) in _RENAMES.items():
        if any(n.startswith(theirs) for n in names):
            return theirs_family
    return architectures.LLAMA.family


def split_path(path: str) -> tuple[str, int, str] | None:
    """`model.layers.3.self_attn.q_proj` -> (`model.layers`, 3, `self_attn.q_proj`).

    Architectures outside the registry (the torch engine's) split at their first block index:
    `gpt_neox.layers.0.attention.dense` -> (`gpt_neox.layers`, 0, `attention.dense`).
    """
    m = _BLOCK.match(path) or _ANY_BLOCK.match(path)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else None


def kind_of(paths: Sequence[str]) -> str:
    """The naming family of our module paths: `gpt2` (`transformer.h.`), else `llama`."""
    return next((architectures.family_of_blocks(p).family for p in paths if split_path(p)), architectures.LLAMA.family)


def paths_of(params: Mapping[str, Array]) -> list[str]:
    """The module paths a flat adapter dict adapts, sorted."""
    return sorted({n.rpartition(".")[0] for n in params})


def layers_and_keys(paths: Sequence[str]) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Sorted block indices and sorted block keys (FineTune's order) that module `paths` adapt."""
    parts = [p for p in (split_path(x) for x in paths) if p is not None]
    return tuple(sorted({i for _, i, _ in parts})), tuple(sorted({k for _, _, k in parts}))


def block_shapes(
    linear_shapes: Mapping[str, tuple[int, int]], prefix: str, layers: int
) -> dict[str, tuple[int, int]]:
    """`{<prefix>.<i>.<key>: (in, out)}` for every linear of every block (from a config)."""
    return {f"{prefix}.{i}.{k}": s for i in range(layers) for k, s in linear_shapes.items()}


def missing_targets(params: Mapping[str, Array], targets: Sequence[str]) -> list[str]:
    """Module paths the config targets that the file has no tensors for, sorted."""
    return sorted(set(targets) - {k.rpartition(".")[0] for k in params})


def ranges(values: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out: list[list[int]] = []
    for v in sorted(set(values)):
        if out and out[-1][1] == v - 1:
            out[-1][1] = v
        else:
            out.append([v, v])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in out)
