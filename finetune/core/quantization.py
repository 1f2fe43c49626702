"""Quantized bases in mlx-lm's layout (pure): the config block, per-layer decisions, the record.

mlx-lm writes `quantization` (and the same object as `quantization_config`) in config.json:
`{"group_size", "bits", "mode", "<module path>": {...} | false}`. A quantized module stores
`<path>.weight` packed into uint32 (out, in · bits / 32), `<path>.scales` (out, in / group) and,
in affine mode, `<path>.biases`. Weights are in MLX's layout (GPT-2's linears already (out, in)).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping
from typing import Any

from msgspec import Struct
from returns.result import Failure, Result, Success

# mode -> (allowed bits, allowed group sizes, default (group size, bits)): mx.quantize's table.
MODES: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, int]]] = {
    "affine": ((1, 2, 3, 4, 5, 6, 8), (32, 64, 128), (64, 4)),
    "mxfp4": ((4,), (32,), (32, 4)),
    "mxfp8": ((8,), (32,), (32, 8)),
    "nvfp4": ((4,), (16,), (16, 4)),
}
_FIELDS = ("group_size", "bits", "mode")
INFER = 0  # a group size written as null: the scales' shape tells it (in / scales' last dim)
ON_LOAD = "quantized_on_load"  # in an adapter's record: the base was quantized from a float checkpoint
DIGEST = "base_digest"  # in an adapter's record: which weights, quantized (see `codes_digest`)
# HuggingFace-side schemes (quantization_config.quant_method) and what to do instead.
_INSTEAD = "convert the float model with `mlx_lm convert -q` (or load it with --quantize-bits 4)"


class Params(Struct, frozen=True, kw_only=True):
    group_size: int
    bits: int
    mode: str = "affine"

    def as_dict(self) -> dict[str, Any]:
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}


class Quant(Struct, frozen=True, kw_only=True):
    """A base's quantization: the default and per-layer overrides (`None` = left in float)."""

    default: Params
    overrides: dict[str, Params | None] = {}

    @property
    def bits(self) -> int:
        return self.default.bits

    @property
    def group_size(self) -> int:
        return self.default.group_size

    @property
    def mode(self) -> str:
        return self.default.mode

    def params(self, path: str) -> Params | None:
        return self.overrides.get(path, self.default)

    def as_config(self) -> dict[str, Any]:
        """The config.json block (mlx-lm's format)."""
        own = {p: (v.as_dict() if v else False) for p, v in sorted(self.overrides.items())}
        return {**self.default.as_dict(), **own}

    def summary(self) -> str:
        mixed = f", {len(self.overrides)} layers differ" if self.overrides else ""
        group = "from the scales" if self.group_size == INFER else self.group_size
        return f"{self.bits}-bit {self.mode}, group size {group}{mixed}"


def _params(raw: Mapping[str, Any], where: str) -> Result[Params, str]:
    """Missing fields take the mode's defaults, as `to_quantized` does for a per-layer entry;
    `"group_size": null` (mlx-lm 0.32's mixed recipes) is `INFER`: read from the stored scales."""
    mode = raw.get("mode", "affine")
    if mode not in MODES:
        return Failure(f"{where}: quantization mode {mode!r} is unknown; MLX offers {', '.join(MODES)}")
    bits_ok, groups_ok, (group0, bits0) = MODES[mode]
    bits, group = raw.get("bits", bits0), raw.get("group_size", group0)
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in bits_ok:
        return Failure(f"{where}: {mode} quantization takes bits {', '.join(map(str, bits_ok))}, got {bits!r}")
    if group is None:
        return Success(Params(group_size=INFER, bits=bits, mode=mode))
    if not isinstance(group, int) or isinstance(group, bool) or group not in groups_ok:
        return Failure(f"{where}: {mode} quantization takes group_size {', '.join(map(str, groups_ok))}, got {group!r}")
    return Success(Params(group_size=group, bits=bits, mode=mode))


def parse_block(block: Any, where: str) -> Result[Quant, str]:
    """A `quantization` object (config.json or an adapter's record) -> Quant."""
    if not isinstance(block, Mapping):
        return Failure(f"{where}: 'quantization' must be an object with 'bits' and 'group_size'")
    if "bits" not in block:
        return Failure(f"{where}: 'quantization' lacks 'bits'")
    match _params(block, where):
        case Success(default):
            pass
        case failure:
            return failure
    overrides: dict[str, Params | None] = {}
    for path, value in block.items():
        if path in _FIELDS or path in (ON_LOAD, DIGEST):
            continue
        if value is False:
            overrides[path] = None
        elif value is True:
            continue  # the default
        elif isinstance(value, Mapping):
            match _params(value, f"{where}: quantization.{path}"):
                case Success(own):
                    if own != default:
                        overrides[path] = own
                case failure:
                    return failure
        else:
            return Failure(f"{where}: quantization.{path} must be an object or false, got {value!r}")
    return Success(Quant(default=default, overrides=overrides))


def from_config(config: Mapping[str, Any], where: str = "config.json") -> Result[Quant | None, str]:
    """The checkpoint's MLX quantization (None for a float checkpoint); HF-side schemes are refused."""
    block = config.get("quantization")
    if block is None:
        block = config.get("quantization_config")
        if block is None:
            return Success(None)
        if isinstance(block, Mapping) and "quant_method" in block:
            method = block["quant_method"]
            return Failure(f"{where}: quantized with {method!r} (HuggingFace-side quantization), which "
                           f"FineTune cannot load; {_INSTEAD}")
    return parse_block(block, where).map(lambda q: _our_paths(str(config.get("model_type")), q))


def _our_paths(model_type: str, quant: Quant) -> Quant:
    """Per-layer entries under our module paths (mlx-lm's Gemma 3 names them `language_model.model.`)."""
    from finetune.core import convert

    if model_type not in convert.SUPPORTED or not quant.overrides:
        return quant
    return Quant(default=quant.default, overrides=convert.text_names(model_type, quant.overrides))


def without_quantization(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config without its quantization fields (what the float modules are built from)."""
    return {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}


def stored_plan(
    quant: Quant, in_dims: Mapping[str, int], stored: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]],
    where: str,
) -> Result[dict[str, Params], str]:
    """Which modules load quantized and how, checked against the stored arrays.

    `in_dims`: quantizable module path -> input width (embeddings: their dims);
    `stored`: path -> (packed weight shape, scales shape) for every `<path>.scales` in the files.
    """
    if extra := sorted(stored.keys() - in_dims.keys()):
        return Failure(f"{where}: {extra[0]}.scales names no linear or embedding of this model")
    plan: dict[str, Params] = {}
    for path, width in in_dims.items():
        params = quant.params(path)
        if path not in stored:
            if path in quant.overrides and params is not None:
                return Failure(f"{where}: config.json quantizes {path} but the checkpoint has no {path}.scales")
            continue
        if params is None:
            return Failure(f"{where}: config.json leaves {path} in float (false) but the checkpoint stores it quantized")
        weight, scales = stored[path]
        if params.group_size == INFER:
            match _inferred(params, width, scales, f"{where}: quantization.{path}"):
                case Success(params):
                    pass
                case failure:
                    return failure
        if width % params.group_size:
            return Failure(f"{where}: quantization group_size {params.group_size} does not divide {path}'s "
                           f"input width {width}; the config does not describe these weights")
        if weight[-1] * 32 != width * params.bits:
            held = f"{weight[-1] * 32 / width:g}"
            return Failure(f"{where}: config.json says {params.bits}-bit for {path} but its stored weight "
                           f"{tuple(weight)} holds {held}-bit values; fix 'bits' in config.json")
        if scales[-1] != width // params.group_size:
            return Failure(f"{where}: config.json says group_size {params.group_size} for {path} but its "
                           f"scales {tuple(scales)} mean group size {width // max(scales[-1], 1)}")
        plan[path] = params
    return Success(plan)


def _inferred(params: Params, width: int, scales: tuple[int, ...], where: str) -> Result[Params, str]:
    """A null group size read from the scales, as mlx-lm 0.32 does: in / scales' last dim."""
    groups_ok = MODES[params.mode][1]
    group = width // scales[-1] if scales and scales[-1] and width % scales[-1] == 0 else 0
    if group not in groups_ok:
        return Failure(f"{where}: group_size is null and scales {tuple(scales)} over input width {width} give no "
                       f"{params.mode} group size ({', '.join(map(str, groups_ok))})")
    return Success(Params(group_size=group, bits=params.bits, mode=params.mode))


def load_plan(quant: Quant, in_dims: Mapping[str, int], flag: str) -> Result[dict[str, Params], str]:
    """Quantizing a float model on load: every module unless overridden; the group must divide."""
    plan: dict[str, Params] = {}
    for path, width in in_dims.items():
        params = quant.params(path)
        if params is None:
            continue
        if params.group_size == INFER:
            return Failure(f"{flag}: group_size is null for {path}; quantizing on load needs a group size")
        if width % params.group_size:
            fits = [g for g in MODES[params.mode][1] if width % g == 0]
            hint = f"; use {' or '.join(map(str, fits))}" if fits else ""
            return Failure(f"{flag}: group size {params.group_size} does not divide {path}'s input width {width}{hint}")
        plan[path] = params
    return Success(plan)


def describe(layers: Mapping[str, Params | None]) -> Quant | None:
    """The canonical Quant of a model's quantizable modules (None when all are float)."""
    used = Counter(p for p in layers.values() if p is not None)
    if not used:
        return None
    default = max(used, key=lambda p: (used[p], p.bits, p.group_size))  # ties: a fixed choice
    return Quant(default=default, overrides={k: v for k, v in sorted(layers.items()) if v != default})


def record(quant: Quant | None, on_load: bool, digest: str = "") -> dict[str, Any] | None:
    """What an adapter stores about its base (`base_quantization` in adapter_config.json)."""
    return None if quant is None else {**quant.as_config(), ON_LOAD: on_load, **({DIGEST: digest} if digest else {})}


def codes_digest(codes: Mapping[str, bytes]) -> str:
    """The identity of a quantized base: SHA-256 of every quantized module's packed weight words
    (uint32) with its scales and biases (as float32), by module path."""
    h = hashlib.sha256()
    for path in sorted(codes):
        h.update(path.encode() + b"\0" + len(codes[path]).to_bytes(8, "little") + codes[path])
    return h.hexdigest()


def mlx_names(model_type: str, tensors: Mapping[str, Any]) -> dict[str, Any]:
    """mlx-lm's tensor names -> ours: its GPT-2 module is `model.` where ours is `transformer.`; its
    Gemma 3 image-text model keeps the text model at `language_model.model.` (a vision tower is dropped)."""
    from finetune.core import convert

    if model_type in convert.SUPPORTED and model_type != "gpt2":
        return convert.text_names(model_type, tensors)
    if model_type != "gpt2":
        return dict(tensors)
    out = {}
    for k, v in tensors.items():
        if k.endswith(".attn.bias") or k.endswith(".attn.masked_bias"):
            continue  # causal-mask buffers
        out[k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k.removeprefix("model.")] = v
    return out


def ours_to_mlx(model_type: str, tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Our names -> mlx-lm's (inverse of `mlx_names` on our own keys)."""
    from finetune.core import convert

    if model_type in convert.SUPPORTED and model_type != "gpt2":
        return convert.older_names(model_type, tensors)
    if model_type != "gpt2":
        return dict(tensors)
    return {("model." + k.removeprefix("transformer.") if k.startswith("transformer.") else k): v for k, v in tensors.items()}


def on_load(bits: int, group_size: int) -> Quant | None:
    """The recipe's `quantize_bits`/`quantize_group_size` (0 bits: keep the float base)."""
    return Quant(default=Params(group_size=group_size, bits=bits)) if bits else None


def base_mismatch(want: Quant | None, have: Quant | None, adapter: str, want_digest: str = "",
                  have_digest: str = "") -> str | None:
    """The refusal when an adapter's recorded base is not this base (its quantization, or, where
    both digests are known, its quantized weights), else None."""
    if have == want and want_digest and have_digest and want_digest != have_digest:
        return (f"{adapter}: the adapter was trained on another {want.summary() if want else 'float'} base "
                "(this base's quantized weights differ: another model, or other weights quantized on load); "
                "load the base it was trained on")
    if have == want:
        return None
    said = want.summary() if want else "float"
    found = have.summary() if have else "float"
    return (f"{adapter}: the adapter was trained on a {said} base, but this base is {found}; "
            "load the base it was trained on")
