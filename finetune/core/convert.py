"""Pure HF <-> MLX weight conversion: key tables, Conv1D transposes, tied embeddings, shards.

Our modules keep HuggingFace names, so a converted checkpoint has the keys of the HF
`*ForCausalLM` state dict: `model.layers.{i}.self_attn.q_proj.weight` for the Llama family and
`transformer.h.{i}.attn.c_attn.weight` for GPT-2 (the `transformer.` prefix is kept; bare GPT-2
checkpoints such as `gpt2` itself get it added), and Gemma 3 image-text's text model under
`model.language_model.` (its checkpoints' `language_model.model.`; the vision tower and projector are
not ours: skipped on load, written back by `ft fuse`). Differences from the HF files: buffers are
dropped, GPT-2's Conv1D weights are transposed to nn.Linear's (out, in), and a tied model has no
`lm_head.weight`. Nothing here reads files or mutates its arguments.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from returns.result import Failure, Result, Success

from finetune.core import architectures
from finetune.core.architectures import Architecture, Entry

SUPPORTED = architectures.SUPPORTED
Array = Any  # any engine's array with .T, .shape and ==: MLX's, NumPy's, torch's

Shape = tuple[int, ...]


def _arch(model_type: str) -> Architecture:
    if model_type not in architectures.REGISTRY:
        raise ValueError(architectures.unsupported(model_type))
    return architectures.REGISTRY[model_type]


def _symbols(model_type: str, config: Mapping) -> dict[str, int]:
    return _arch(model_type).read(model_type, config).symbols()


def _shapes(arch: Architecture, dims: Mapping[str, int]) -> dict[str, Shape]:
    def keep(entries: tuple[Entry, ...]) -> list[tuple[str, Shape]]:
        return [
            (n, tuple(dims[s] for s in sym)) for n, sym, flag in entries if not flag or dims[flag]
        ]

    layer = keep(arch.layer)
    out = dict(keep(arch.top))
    for i in range(dims["L"]):
        out.update({f"{arch.blocks}.{i}.{name}": shape for name, shape in layer})
    return out


def expected_shapes(model_type: str, config: Mapping) -> dict[str, Shape]:
    """Key -> shape of the converted (MLX-layout) weights; raises on bad type or config."""
    return _shapes(_arch(model_type), _symbols(model_type, config))


def _is_conv1d(arch: Architecture, key: str) -> bool:
    head, _, rest = key.partition(arch.blocks + ".")  # transformer.h.{i}.attn.c_attn.weight
    index, _, inner = rest.partition(".")
    return not head and index.isdigit() and inner.endswith(".weight") and inner[: -len(".weight")] in arch.conv1d


def _buffer(arch: Architecture, key: str) -> bool:
    return key.endswith(arch.buffers)


def _canonical(arch: Architecture, key: str, roots: frozenset[str]) -> str:
    """Older spellings renamed (Gemma 3's `language_model.model.` -> `model.language_model.`), and the
    base-model prefix added to bare keys (`h.0.ln_1.weight` -> `transformer.h.0...`)."""
    stored = next((s for s, _ in arch.renames if key.startswith(s)), None)
    if stored is not None:
        return dict(arch.renames)[stored] + key[len(stored):]
    return arch.prefix + key if key.split(".")[0] in roots else key


def is_other(model_type: str, key: str) -> bool:
    """A tensor of a part the text model does not hold (Gemma 3's vision tower and projector)."""
    return key.startswith(_arch(model_type).others) if _arch(model_type).others else False


def other_parts(model_type: str, weights: Mapping[str, Array]) -> dict[str, Array]:
    """The tensors outside the text model, under their stored names (what `ft fuse` writes back)."""
    return {k: v for k, v in weights.items() if is_other(model_type, k)}


def older_names(model_type: str, weights: Mapping[str, Array]) -> dict[str, Array]:
    """Our tensors under the older spelling (Gemma 3's `language_model.model.`, as transformers 5 still
    saves it and mlx-lm names it); unchanged for architectures with one spelling."""
    back = [(ours, stored) for stored, ours in _arch(model_type).renames]
    return {next((s + k[len(o):] for o, s in back if k.startswith(o)), k): v for k, v in weights.items()}


def text_names(model_type: str, weights: Mapping[str, Array]) -> dict[str, Array]:
    """The text model's tensors in our spelling (older spellings renamed, other parts dropped)."""
    arch = _arch(model_type)
    return {_canonical(arch, k, frozenset()): v for k, v in weights.items() if not is_other(model_type, k)}


def stored_names(model_type: str, weights: Mapping[str, Array], like: Sequence[str]) -> dict[str, Array]:
    """Our tensors under the spelling of a checkpoint whose keys are `like`: the older one where `like`
    uses it, else ours."""
    if not any(k.startswith(s) for k in like for s, _ in _arch(model_type).renames):
        return dict(weights)
    return older_names(model_type, weights)


def _listing(label: str, keys: set[str], limit: int = 10) -> str:
    names = sorted(keys)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return f"{label} {len(names)}: {', '.join(names[:limit])}{more}"


def hf_to_mlx(
    model_type: str, config: Mapping, weights: Mapping[str, Array]
) -> Result[dict[str, Array], str]:
    """HF checkpoint tensors -> our modules' weights, or a Failure naming the bad keys/shapes."""
    if model_type not in architectures.REGISTRY:
        return Failure(architectures.unsupported(model_type))
    arch = architectures.REGISTRY[model_type]
    try:
        dims = arch.read(model_type, config).symbols()
    except KeyError as e:
        return Failure(f"config for {model_type!r} lacks field {e.args[0]!r}")
    shapes = _shapes(arch, dims)
    roots = frozenset(k[len(arch.prefix):].split(".")[0] for k in shapes if k.startswith(arch.prefix))

    renamed: dict[str, Array] = {}
    for key, value in weights.items():
        if _buffer(arch, key) or is_other(model_type, key):
            continue
        name = _canonical(arch, key, roots)
        if name in renamed:
            return Failure(f"two checkpoint tensors map to {name!r} (one is {key!r})")
        renamed[name] = value

    if not dims["untied"] and "lm_head.weight" in renamed and arch.embed in renamed:
        head, embed = renamed.pop("lm_head.weight"), renamed[arch.embed]
        if head.shape != embed.shape or not bool((head == embed).all()):
            return Failure(
                f"config ties word embeddings but lm_head.weight differs from {arch.embed}"
            )

    unknown, missing = renamed.keys() - shapes.keys(), shapes.keys() - renamed.keys()
    if arch.renames:  # named as this checkpoint spells them
        unknown, missing = (set(stored_names(model_type, dict.fromkeys(x), list(weights))) for x in (unknown, missing))
    if unknown or missing:
        parts = [
            _listing("unknown keys", unknown) if unknown else "",
            _listing("missing keys", missing) if missing else "",
        ]
        return Failure(
            f"{model_type} checkpoint does not match its config: "
            + "; ".join(p for p in parts if p)
        )

    for name, shape in shapes.items():  # compared in the checkpoint's own layout
        want = shape[::-1] if _is_conv1d(arch, name) else shape
        if tuple(renamed[name].shape) != want:
            return Failure(
                f"shape mismatch for {name}: expected {want}, got {tuple(renamed[name].shape)}"
            )

    return Success({k: v.T if _is_conv1d(arch, k) else v for k, v in renamed.items()})


def mlx_to_hf(
    model_type: str, config: Mapping, weights: Mapping[str, Array]
) -> dict[str, Array]:
    """Our weights -> HF checkpoint tensors (inverse of `hf_to_mlx` on canonical checkpoints)."""
    arch = _arch(model_type)
    return {k: v.T if _is_conv1d(arch, k) else v for k, v in weights.items()}


def merge_shards(shards: Sequence[Mapping[str, Array]]) -> Result[dict[str, Array], str]:
    """Union of shard dicts; a key present in two shards is a Failure."""
    merged: dict[str, Array] = {}
    owner: dict[str, int] = {}
    for i, shard in enumerate(shards):
        for key, value in shard.items():
            if key in merged:
                return Failure(f"tensor {key!r} appears in shard {owner[key]} and shard {i}")
            merged[key], owner[key] = value, i
    return Success(merged)
