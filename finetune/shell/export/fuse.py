"""`ft fuse`: merge an adapter into its base model and write a complete HF model directory.

read base + adapter with NumPy -> fuse every LoRA pair in float32 (quantized layers dequantized;
affine in NumPy) -> round to the output dtype, and re-quantize a quantized base's fused layers
(mx.quantize) unless --dequantize -> check logits with one engine (fuse_check) -> write config,
safetensors shards (+ index), tokenizer and generation files into a temporary directory -> rename.

Only the check runs a model, and only MLX-quantized bases need MLX itself.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from msgspec import Struct
from returns.result import Failure, Result, Success

from finetune.core import dtypes, fusing, quantization
from finetune.core.quantization import Params, Quant
from finetune.shell.export import adapters, fuse_check, tensorfile
from finetune.shell.models import sources, weights

Log = Callable[[str], None]
PROMPT = ("The quick brown fox jumps over the lazy dog. SELECT name, age FROM users WHERE id = 42;\n"
          "Q: What is the capital of France?\nA: Paris.")
MAX_TOKENS = 64  # per check row


class Fused(Struct, frozen=True, kw_only=True):
    output: str
    dtype: str
    layers: int  # LoRA pairs merged
    files: list[str]
    size: int  # bytes of weights written
    check: fusing.Check
    engine: str = ""  # whose libraries ran the check
    dequantized: bool = False
    quantization: str = ""  # how the written weights are quantized ("" = float)


class Base(Struct, frozen=True, kw_only=True):
    """The base checkpoint in our names (NumPy), with its quantized layers."""

    tensors: dict[str, np.ndarray]  # quantized layers packed as mlx-lm stores them
    plan: dict[str, Params]  # quantized module path -> how
    layers: dict[str, Params | None]  # every quantizable module (None = float)
    needs_mlx: str = ""  # why this base needs MLX ("" = it does not)


def fuse(
    model_spec: str,
    adapter: Path,
    output: Path,
    *,
    dtype: str | None = None,
    dequantize: bool = False,
    data: str | None = None,
    rows: int = 4,
    max_shard_bytes: int = 2_000_000_000,
    force: bool = False,
    revision: str = "main",
    backend: str | None = None,
    log: Log = lambda _: None,
) -> Result[Fused, str]:
    """Fuse `adapter` into `model_spec` and write `output`, or a one-line reason (nothing written).

    A quantized base (as stored, or as the adapter records it was quantized on load) gives a
    fused model quantized the same way, unless `dequantize`. `backend` picks the engine whose
    libraries run the logit check (`auto`: as `--backend auto` picks).
    """
    match _target(model_spec, revision, adapter, output, force):
        case Success((directory, config)):
            pass
        case failure:
            return failure
    log(f"Loading {model_spec} with {adapter} ...")
    match adapters.load_any(adapter).bind(lambda a: adapters.fit(a, config).map(lambda p: (a, p))).bind(
        lambda found: _base(directory, config, found[0], model_spec).map(lambda b: (found[0], found[1], b))
    ):
        case Success((found, params, base)):
            pass
        case failure:
            return failure
    target = dtype or _default_dtype(directory, config)
    quant = None if dequantize else quantization.describe(base.layers)
    why = base.needs_mlx or ("re-quantizing the fused model needs MLX (the base is quantized; "
                             "--dequantize writes float weights)" if quant else "")
    match _engine(backend, why):
        case Success(engine):
            pass
        case failure:
            return failure
    match _check_rows(directory, data, rows, int(config.get("vocab_size", 1 << 30))):
        case Success(ids):
            pass
        case failure:
            return failure
    pairs = {p.removesuffix(".lora_a"): (a, params[p.removesuffix(".lora_a") + ".lora_b"])
             for p, a in params.items() if p.endswith(".lora_a")}
    log(f"Fusing into {target}{' (re-quantized: ' + quant.summary() + ')' if quant else ''}; checking with {engine} ...")
    dense = _dense(base)
    stored = dtypes.cast_floats(fusing.fuse_all(dense, pairs, found.scale), target)
    base_stored = dtypes.cast_floats(dense, target)
    if quant is not None:
        stored = requantize(stored, base.tensors, base.plan, set(pairs))
        base_stored = requantize(base_stored, base.tensors, base.plan, set(pairs))  # the format's own noise
    model_base = base.tensors if quant is not None or engine == "mlx" else dense
    plain, adapted, (cast, fused) = fuse_check.logits(
        engine, config, ids, model_base, base.plan if model_base is base.tensors else {}, pairs, found.scale,
        [base_stored, stored], base.plan if quant is not None else {})
    check = fusing.measure(plain, adapted, cast, fused, target, quant.summary() if quant else "")
    match fusing.verdict(check):
        case Failure(message):
            return Failure(f"refusing to write {output}: {message}")
    kind = config["model_type"]
    if quant is not None:  # mlx-lm's layout, as its own fuse writes a quantized model
        tensors, metadata = quantization.ours_to_mlx(kind, dtypes.cast_floats(stored, target)), "mlx"
    else:
        tensors, metadata = fusing.hf_tensors(kind, config, stored), "pt"
    names = _write(output, directory, tensors, fusing.fused_config(config, target, quant), metadata,
                   max_shard_bytes, force, log)
    return Success(Fused(
        output=str(output), dtype=target, layers=len(pairs), files=names,
        size=sum(v.nbytes for v in tensors.values()), check=check, engine=engine,
        dequantized=bool(base.plan) and quant is None, quantization=quant.summary() if quant else "",
    ))


def _target(spec: str, revision: str, adapter: Path, output: Path, force: bool) -> Result[tuple[Path, dict], str]:
    """The base's directory and config, after checking OUTPUT can be written."""
    from finetune.shell.models.load import model_config

    if output.exists() and not output.is_dir():
        return Failure(f"{output}: exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not force:
        return Failure(f"{output}: already exists and is not empty; pass --force to replace it")
    match model_config(spec, revision):
        case Success((directory, config)):
            pass
        case failure:
            return failure
    for other in (directory, adapter):
        if other.exists() and output.resolve() == other.resolve():
            return Failure(f"{output}: is the {'model' if other == directory else 'adapter'} directory itself; choose another --output")
    return Success((directory, dict(config)))


def _engine(backend: str | None, needs_mlx: str) -> Result[str, str]:
    """Which engine runs the check: `--backend`'s choice, or MLX where the base needs it."""
    import os

    from finetune.engines import choose

    if not needs_mlx:
        return Success(choose.decide(backend)[0])
    if not choose.installed("mlx"):
        return Failure(f"{needs_mlx}, and MLX is not installed here ({choose.INSTALL_MLX})")
    if (backend or os.environ.get("FT_BACKEND") or "auto") == "torch":
        return Failure(f"--backend torch: {needs_mlx}; use --backend mlx")
    return Success("mlx")


def _read_checkpoint(directory: Path) -> Result[dict[str, np.ndarray], str]:
    """Every tensor of a HF model directory as NumPy arrays, shards merged."""
    from finetune.core.convert import merge_shards
    from finetune.shell.models.torchbin import read_torch_bin_numpy

    match weights.checkpoint_files(directory):
        case Success(files):
            pass
        case failure:
            return failure
    shards = []
    for f in files:
        match read_torch_bin_numpy(f) if f.suffix == ".bin" else tensorfile.read(f):
            case Success(tensors):
                shards.append(tensors)
            case failure:
                return failure
    return merge_shards(shards).alt(lambda m: f"{directory}: {m}")


def _base(directory: Path, config: dict, adapter: adapters.Adapter, spec: str) -> Result[Base, str]:
    """The base's tensors in our names and how its layers are quantized (as stored, or as the
    adapter records they were quantized on load)."""
    from finetune.core.convert import expected_shapes, hf_to_mlx

    kind, plain = config["model_type"], quantization.without_quantization(config)
    shapes = expected_shapes(kind, plain)
    in_dims = {k.removesuffix(".weight"): s[-1] for k, s in shapes.items() if k.endswith(".weight") and len(s) == 2}
    stored = quantization.from_config(config).value_or(None)
    record = adapter.spec.base_quantization if adapter.spec else None
    match _read_checkpoint(directory):
        case Success(raw):
            pass
        case failure:
            return failure
    if stored is not None:
        found = _quantized(quantization.mlx_names(kind, raw), stored, in_dims, shapes, spec)
    else:
        found = hf_to_mlx(kind, plain, raw).alt(lambda m: f"{spec}: {m}").bind(lambda t: _on_load(t, record, in_dims, spec))
    match found:
        case Success((tensors, plan)):
            pass
        case failure:
            return failure
    layers = {p: plan.get(p) for p in in_dims}
    want = quantization.parse_block(record, str(adapter.config_path)).value_or(None) if record else None
    if record and quantization.describe(layers) != want:
        have = quantization.describe(layers)
        return Failure(f"{adapter.directory}: the adapter was trained on a {want.summary() if want else 'float'} base, "
                       f"but this base is {have.summary() if have else 'float'}; load the base it was trained on")
    modes = sorted({p.mode for p in plan.values()} - {"affine"})
    needs = f"{modes[0]} quantization is dequantized with MLX" if modes else ""
    if record and record.get(quantization.ON_LOAD):
        needs = "the adapter was trained on a base quantized on load, which MLX quantizes"
    return Success(Base(tensors=tensors, plan=plan, layers=layers, needs_mlx=needs))


def _quantized(tensors: dict, quant: Quant, in_dims: dict, shapes: dict, spec: str) -> Result[tuple[dict, dict], str]:
    """An mlx-lm quantized checkpoint's tensors (our names) and plan, checked against its config."""
    packed = {k.removesuffix(".scales"): (tuple(tensors[k.removesuffix(".scales") + ".weight"].shape), tuple(v.shape))
              for k, v in tensors.items() if k.endswith(".scales") and k.removesuffix(".scales") + ".weight" in tensors}
    match quantization.stored_plan(quant, in_dims, packed, spec):
        case Success(plan):
            pass
        case failure:
            return failure
    extra = {f"{p}.{leaf}" for p in plan for leaf in ("scales", "biases")}
    unknown, missing = sorted(tensors.keys() - shapes.keys() - extra), sorted(shapes.keys() - tensors.keys())
    if unknown or missing:
        what = f"unknown keys {', '.join(unknown[:5])}" if unknown else f"missing keys {', '.join(missing[:5])}"
        return Failure(f"{spec}: quantized checkpoint does not match its config: {what}")
    for k, shape in shapes.items():
        if k.removesuffix(".weight") not in plan and tuple(tensors[k].shape) != tuple(shape):
            return Failure(f"{spec}: shape mismatch for {k}: expected {tuple(shape)}, got {tuple(tensors[k].shape)}")
    return Success((tensors, plan))


def _on_load(tensors: dict, record: Mapping[str, Any] | None, in_dims: dict, spec: str) -> Result[tuple[dict, dict], str]:
    """A float base as training saw it: quantized (with MLX) when the adapter records that."""
    from finetune.engines.choose import installed

    if not record or not record.get(quantization.ON_LOAD):
        return Success((tensors, {}))
    quant = quantization.parse_block(record, spec).value_or(None)
    match quantization.load_plan(quant, in_dims, "--quantize-group-size") if quant else Success({}):
        case Success(plan):
            pass
        case failure:
            return failure
    if not installed("mlx"):  # refused by _engine with the reason
        return Success((tensors, plan))
    return Success((requantize(dtypes.cast_floats(tensors, "float32"), {}, plan, set(plan)), plan))


def _dense(base: Base) -> dict[str, np.ndarray]:
    """The base's weights in float32, quantized layers dequantized (affine with NumPy)."""
    affine = {p: q for p, q in base.plan.items() if q.mode == "affine"}
    out = fusing.dequantize(dtypes.cast_floats(base.tensors, "float32"), affine)
    if other := {p: q for p, q in base.plan.items() if q.mode != "affine"}:
        import mlx.core as mx

        for path, p in other.items():
            parts = [adapters.mlx_arrays({"x": out.pop(f"{path}.{leaf}")})["x"] if f"{path}.{leaf}" in out else None
                     for leaf in ("weight", "scales", "biases")]
            dense = mx.dequantize(*parts, group_size=p.group_size, bits=p.bits, mode=p.mode).astype(mx.float32)
            out[f"{path}.weight"] = np.array(dense)
    return dtypes.cast_floats(out, "float32")


def requantize(dense: Mapping[str, np.ndarray], packed: Mapping[str, np.ndarray], plan: Mapping[str, Params],
               changed: set[str]) -> dict[str, np.ndarray]:
    """`dense` with every planned module quantized again (mx.quantize, as mlx-lm does): a
    `changed` one from its dense weight, the others as they were stored (`packed`)."""
    import mlx.core as mx

    from finetune.core.dtypes import BF16

    def numpy(x: mx.array) -> np.ndarray:
        return np.array(x.view(mx.uint16)).view(BF16) if x.dtype == mx.bfloat16 else np.array(x)

    out = dict(dense)
    for path, p in plan.items():
        names = [f"{path}.{leaf}" for leaf in ("weight", "scales", "biases")]
        if path in changed:
            weight = adapters.mlx_arrays({"w": dense[f"{path}.weight"]})["w"]
            parts = [numpy(x) for x in mx.quantize(weight, group_size=p.group_size, bits=p.bits, mode=p.mode)]
        else:
            parts = [packed[n] for n in names if n in packed]
        out.update(zip(names, parts, strict=False))
    return out


def _write(output: Path, directory: Path, tensors: dict[str, np.ndarray], config: dict, metadata: str,
           max_shard_bytes: int, force: bool, log: Log) -> list[str]:
    """Config, weight shards (+ index) and the base's tokenizer files, as one rename."""
    from finetune.shell.paths import write_dir

    sizes = {k: v.nbytes for k, v in tensors.items()}
    plan = fusing.shard_plan(sizes, max_shard_bytes)
    names = fusing.shard_names(len(plan))
    log(f"Writing {output} ({len(names)} weight file{'s' if len(names) > 1 else ''}) ...")

    def build(tmp: Path) -> None:
        for shard, name in zip(plan, names, strict=True):
            tensorfile.write(tmp / name, {k: tensors[k] for k in shard}, metadata={"format": metadata})
        if len(plan) > 1:
            _write_json(tmp / fusing.INDEX, fusing.index_json(plan, sizes))
        _write_json(tmp / "config.json", config)
        for f in side_files(directory):
            shutil.copyfile(f, tmp / f.name)  # follows the HF cache's symlinks

    write_dir(output, build, force)
    return names


def side_files(directory: Path) -> list[Path]:
    """Tokenizer, chat template and generation files to copy beside the fused weights."""
    patterns = [p for p in sources.SIDE_FILES if p != "config.json"]
    return sorted({f for p in patterns for f in directory.glob(p) if f.is_file()})


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def _default_dtype(directory: Path, config: dict) -> str:
    """The checkpoint's own float dtype (so the fused model is the base's size), else float32."""
    found = weights.checkpoint_dtype(directory) or config.get("dtype") or config.get("torch_dtype")
    return found if found in fusing.DTYPES else "float32"


def _check_rows(directory: Path, data: str | None, rows: int, vocab: int) -> Result[list[list[int]], str]:
    """Token ids of the check rows: the first `rows` of `data`'s train split, else a fixed prompt."""
    from finetune.shell.models.tokenizer import load_tokenizer

    texts = [PROMPT]
    if data is not None:
        from finetune.core.prepare import normalise_rows
        from finetune.shell.data import datasets

        match datasets.locate(data):
            case Success(files):
                pass
            case failure:
                return failure
        found, _ = datasets.read_rows(files["train"])
        samples, _ = normalise_rows(found[: rows * 4])
        texts = [t for t in (fusing.sample_text(s) for _, s in samples) if t][:rows]
        if not texts:
            return Failure(f"{files['train']}: no usable rows for the fused-model check")
    try:
        tokenizer = load_tokenizer(directory)
    except Exception as err:  # transformers raises OSError/ValueError/... for missing files
        return Failure(f"{directory}: cannot load the tokenizer for the fused-model check ({type(err).__name__})")
    ids = [[i for i in tokenizer(t)["input_ids"] if i < vocab][:MAX_TOKENS] for t in texts]
    ids = [row for row in ids if row]
    return Success(ids) if ids else Failure("the check prompt tokenizes to nothing")
