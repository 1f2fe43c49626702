"""PEFT LoRA adapters <-> our adapters (pure): tensor names, layouts, `adapter_config.json`.

PEFT stores `base_model.model.<HF module path>.lora_A.weight` (r, in) and `.lora_B.weight`
(out, r) and computes `y = W x + (alpha / r) · B(A(x))` (`alpha / √r` with rsLoRA); with `use_dora`
also `.lora_magnitude_vector` (out,), our DoRA `.m` (same values, same layout). Our tensors are
`<path>.lora_a` = lora_Aᵀ (in, r) and `<path>.lora_b` = lora_Bᵀ (r, out) with `scale` a plain
multiplier. GPT-2's Conv1D layers are no exception: PEFT's `lora_A`/`lora_B` are nn.Linear there
too (`fan_in_fan_out=True` only tells PEFT how to merge into the transposed base weight).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from msgspec import Struct
from returns.result import Failure, Result, Success

from finetune.core import architectures
from finetune.core.adapters import (
    BLOCK_LINEARS,
    AdapterSpec,
    kind_of,
    layers_and_keys,
    ranges,
    split_path,
)

Array = Any  # an engine's array (MLX, NumPy, torch): only names and shapes are read here

PREFIX = "base_model.model."
_PEFT_NAME = re.compile(r"^base_model\.model\.(.+)\.(?:(lora_A|lora_B)\.weight|(lora_magnitude_vector))$")
_LEAVES = {"lora_A": "lora_a", "lora_B": "lora_b", "lora_magnitude_vector": "m"}
# PEFT options that change what the adapter computes in ways our LoRA layers do not.
_UNSUPPORTED = (
    ("lora_bias", "trained LoRA biases (lora_bias)"),
    ("modules_to_save", "fully trained extra modules (modules_to_save)"),
    ("trainable_token_indices", "trained token embeddings (trainable_token_indices)"),
    ("rank_pattern", "per-module ranks (rank_pattern)"),
    ("alpha_pattern", "per-module alphas (alpha_pattern)"),
    ("layer_replication", "layer replication"),
    ("alora_invocation_tokens", "activated LoRA (alora_invocation_tokens)"),
    ("use_qalora", "QA-LoRA (use_qalora)"),
    ("target_parameters", "LoRA on parameters (target_parameters)"),
    ("megatron_config", "Megatron layers (megatron_config)"),
    ("use_bdlora", "BD-LoRA (use_bdlora)"),
)

# Initialisations that rewrite the base weights, so the adapter only works on the altered base.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


class PeftSpec(Struct, frozen=True, kw_only=True):
    """What a PEFT `adapter_config.json` says, reduced to what LoRA inference needs."""

    rank: int
    alpha: float
    rslora: bool = False
    dropout: float = 0.0
    base_model: str = ""
    target_modules: tuple[str, ...] | str = ()
    layers_to_transform: tuple[int, ...] | None = None
    fan_in_fan_out: bool = False
    use_dora: bool = False

    @property
    def scale(self) -> float:
        """PEFT's `scaling` (alpha / r, or alpha / √r with rsLoRA) as our plain multiplier."""
        return scale_of(self.alpha, self.rank, self.rslora)


def parse_config(raw: Any, source: str) -> Result[PeftSpec, str]:
    """A PEFT `adapter_config.json` value; unsupported features are named, never ignored."""
    if not isinstance(raw, Mapping):
        return Failure(f"{source}: expected a JSON object")
    if raw.get("peft_type") != "LORA":
        return Failure(f"{source}: peft_type {raw.get('peft_type')!r} is not supported (only 'LORA')")
    for field, what in _UNSUPPORTED:
        if raw.get(field):
            return Failure(f"{source}: {what} is not supported; FineTune imports plain LoRA adapters")
    if raw.get("bias", "none") != "none":
        return Failure(f"{source}: bias {raw.get('bias')!r} (trained biases) is not supported; only bias 'none'")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        return Failure(f"{source}: init_lora_weights {init!r} changes the base weights, so the adapter "
                       "does not apply to the original model; not supported")
    rank, alpha = raw.get("r"), raw.get("lora_alpha", 8)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        return Failure(f"{source}: r must be an integer >= 1, got {rank!r}")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        return Failure(f"{source}: lora_alpha must be a number, got {alpha!r}")
    layers = raw.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if layers is not None and not (isinstance(layers, list) and all(isinstance(i, int) for i in layers)):
        return Failure(f"{source}: layers_to_transform must be an integer or a list of integers")
    targets = raw.get("target_modules") or ()
    if not isinstance(targets, str | list):
        return Failure(f"{source}: target_modules must be a list of names or a regex string")
    return Success(PeftSpec(
        rank=rank, alpha=float(alpha), rslora=bool(raw.get("use_rslora", False)),
        dropout=float(raw.get("lora_dropout", 0.0) or 0.0),
        base_model=str(raw.get("base_model_name_or_path") or ""),
        target_modules=targets if isinstance(targets, str) else tuple(targets),
        layers_to_transform=None if layers is None else tuple(layers),
        fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
        use_dora=bool(raw.get("use_dora", False)),
    ))


def from_peft(tensors: Mapping[str, Array], source: str) -> Result[dict[str, Array], str]:
    """PEFT tensors -> `{<path>.lora_a: lora_Aᵀ, <path>.lora_b: lora_Bᵀ, <path>.m: magnitude}` (our module paths)."""
    out: dict[str, Array] = {}
    for name in sorted(tensors):
        m = _PEFT_NAME.match(name)
        if m is None:
            return Failure(f"{source}: {name} is not a LoRA A/B weight or DoRA magnitude (biases, "
                           "embeddings and saved modules are not supported)")
        path, which = m.group(1), m.group(2) or m.group(3)
        if split_path(path) is None:
            return Failure(f"{source}: {name} adapts {path}, outside the transformer blocks; FineTune "
                           "adapters cover the blocks' linear layers only")
        want = 1 if which == "lora_magnitude_vector" else 2
        if tensors[name].ndim != want:
            return Failure(f"{source}: {name} has shape {tuple(tensors[name].shape)}, expected {'a vector' if want == 1 else 'a matrix'}")
        out[f"{path}.{_LEAVES[which]}"] = tensors[name].T
    return Success(out)


def peft_name(name: str) -> str:
    """Our `<path>.lora_a` / `.lora_b` / `.m` -> PEFT's tensor name."""
    path, _, leaf = name.rpartition(".")
    if leaf == "m":
        return f"{PREFIX}{path}.lora_magnitude_vector"
    return f"{PREFIX}{path}.{'lora_A' if leaf == 'lora_a' else 'lora_B'}.weight"


def to_peft(params: Mapping[str, Array]) -> dict[str, Array]:
    """Our tensors (module paths) -> PEFT's names and (r, in) / (out, r) layouts."""
    return {peft_name(name): value.T for name, value in params.items()}


def target_modules(keys: Sequence[str], kind: str) -> list[str]:
    """Leaf names PEFT matches by suffix; a block key where the leaf would also catch another
    linear (GPT-2's `attn.c_proj` vs `mlp.c_proj`)."""
    block = BLOCK_LINEARS.get(kind, ())
    out = set()
    for key in keys:
        leaf = key.rsplit(".", 1)[-1]
        clash = any(o != key and o.rsplit(".", 1)[-1] == leaf and o not in keys for o in block)
        out.add(key if clash else leaf)
    return sorted(out)


def scoped_targets(paths: Sequence[str], every: bool) -> str:
    """A regex PEFT full-matches module names with: exactly the adapted blocks' linears (an image-text
    model's vision tower has `q_proj` too, which leaf names would also catch). `every`: any layer."""
    parts = [p for p in (split_path(x) for x in paths) if p is not None]
    prefix = parts[0][0] if parts else ""
    layers, keys = layers_and_keys(paths)
    index = r"\d+" if every else f"(?:{'|'.join(map(str, layers))})"
    return rf"{re.escape(prefix)}\.{index}\.(?:{'|'.join(map(re.escape, keys))})"


def alpha_for(scale: float, rank: int) -> float:
    """A `lora_alpha` with `alpha / rank == scale` exactly (so import gives `scale` back)."""
    guess = scale * rank
    candidates = [guess]
    for direction in (math.inf, -math.inf):
        x = guess
        for _ in range(3):
            x = math.nextafter(x, direction)
            candidates.append(x)
    return next((c for c in candidates if c / rank == scale), guess)


def scale_of(alpha: float, rank: int, rslora: bool = False) -> float:
    """alpha / r (alpha / √r with rsLoRA); within two ulps, the shortest decimal that exports
    back to the same alpha, so that a scale of 0.1 at rank 3 survives ours -> PEFT -> ours even
    though no float alpha has alpha / 3 == 0.1 exactly."""
    exact = alpha / (math.sqrt(rank) if rslora else rank)
    if rslora or not math.isfinite(exact):
        return exact
    near = [exact]
    for direction in (math.inf, -math.inf):
        x = exact
        for _ in range(2):
            x = math.nextafter(x, direction)
            near.append(x)
    ranked = sorted(near, key=lambda c: (len(repr(c)), abs(c - exact)))
    return next((c for c in ranked if alpha_for(c, rank) == alpha), exact)


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() and abs(x) < 2**53 else x


def config_json(
    spec: AdapterSpec, paths: Sequence[str], base_model: str, kept: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """PEFT's `adapter_config.json` for our adapter adapting `paths` (module paths).

    `kept`: PEFT fields remembered from an import (`lora_alpha`, `use_rslora`, `target_modules`,
    `layers_to_transform`), used when they still describe this adapter, so peft -> ours -> peft gives the same config.
    """
    layers, keys = layers_and_keys(paths)
    kind = kind_of(paths)
    kept = dict(kept or {})
    rslora = bool(kept.get("use_rslora", False))
    alpha = kept.get("lora_alpha")
    same = isinstance(alpha, int | float) and scale_of(alpha, spec.rank, rslora) == spec.scale
    if not same:
        alpha, rslora = alpha_for(spec.scale, spec.rank), False
    targets = kept.get("target_modules") if same and kept.get("target_modules") else target_modules(keys, kind)
    chosen = None if spec.num_layers < 0 else list(layers)
    if same and isinstance(kept.get("layers_to_transform"), list) and sorted(kept["layers_to_transform"]) == list(layers):
        chosen = kept["layers_to_transform"]
    if architectures.FAMILIES[kind].others and not isinstance(targets, str):  # a regex carries the layers
        targets, chosen = scoped_targets(paths, spec.num_layers < 0), None
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or None,
        "r": spec.rank,
        "lora_alpha": _number(alpha),
        "use_rslora": rslora,
        "target_modules": targets,
        "layers_to_transform": chosen,
        "lora_dropout": spec.dropout,
        "fan_in_fan_out": bool(architectures.FAMILIES[kind].conv1d),  # Conv1D bases (GPT-2)
        "bias": "none",
        "use_dora": spec.fine_tune_type == "dora",
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def num_layers(layers: Sequence[int], spec: PeftSpec, total: int | None, source: str) -> Result[int, str]:
    """mlx-lm's `num_layers` for an adapter on `layers`: -1 (all) or the count of the last ones.

    `total`: the base model's block count when known; without it only an adapter whose config
    adapts every layer (no `layers_to_transform`) can be described.
    """
    present = sorted(set(layers))
    if total is None:
        if spec.layers_to_transform is None:
            return Success(-1)
        return Failure(f"{source}: the adapter covers layers {ranges(present)} only; pass --model so "
                       "FineTune knows how many layers the base model has")
    if present == list(range(total)) and spec.layers_to_transform is None:
        return Success(-1)
    if present == list(range(total - len(present), total)):
        return Success(len(present))  # all layers listed explicitly stay explicit (round trips)
    return Failure(f"{source}: the adapter covers layers {ranges(present)} of {total}; mlx-lm adapters "
                   "can only adapt the last layers (load it directly with --adapter instead)")


def to_spec(peft: PeftSpec, paths: Sequence[str], layers: int, model: str = "") -> AdapterSpec:
    """Our AdapterSpec for an imported PEFT adapter adapting `paths`."""
    _, keys = layers_and_keys(paths)
    return AdapterSpec(
        rank=peft.rank, scale=peft.scale, dropout=peft.dropout, keys=keys, num_layers=layers,
        model=model or peft.base_model, fine_tune_type="dora" if peft.use_dora else "lora",
    )


def check_dora(params: Mapping[str, Array], spec: PeftSpec, source: str) -> Result[None, str]:
    """`use_dora` and the magnitudes agree: every adapted module has one with it, none without."""
    paths = sorted({n.rpartition(".")[0] for n in params})
    with_m = {n.rpartition(".")[0] for n in params if n.endswith(".m")}
    if spec.use_dora and (lacking := [p for p in paths if p not in with_m]):
        return Failure(f"{source}: use_dora is true but {PREFIX}{lacking[0]}.lora_magnitude_vector is missing")
    if not spec.use_dora and with_m:
        return Failure(f"{source}: {PREFIX}{sorted(with_m)[0]}.lora_magnitude_vector is a DoRA magnitude "
                       "but adapter_config.json does not set use_dora")
    return Success(None)


def kept_fields(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The PEFT fields an import remembers for a later export."""
    fields = ("lora_alpha", "use_rslora", "target_modules", "layers_to_transform")
    return {k: raw[k] for k in fields if raw.get(k) is not None}
