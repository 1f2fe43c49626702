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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from msgspec import Struct
from returns.result import Failure, Result, Success

from finetune.core import dtypes, fusing, quantization
from finetune.core.quantization import Quant
from finetune.files import sources, tensorfile, weights
from finetune.shell.export import adapters, fuse_base, fuse_check

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
    full: bool = False  # a full fine-tune's trained weights written over the base (`fuse_full`)


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
    libraries run the logit check (`auto`: as `--backend auto` picks). A full fine-tune's run is
    written over the base as it is (`fuse_full`: nothing to fuse).
    """
    from finetune.files.adapters import is_full

    if is_full(adapter):
        from finetune.shell.export import fuse_full

        return fuse_full.write(model_spec, adapter, output, dtype=dtype, max_shard_bytes=max_shard_bytes, force=force,
                               revision=revision, log=log)
    match _target(model_spec, revision, adapter, output, force):
        case Success((directory, config)):
            pass
        case failure:
            return failure
    log(f"Loading {model_spec} with {adapter} ...")
    match adapters.load_any(adapter).bind(lambda a: adapters.fit(a, config).map(lambda p: (a, p))).bind(
        lambda found: fuse_base.read(directory, config, found[0], model_spec).map(lambda b: (found[0], found[1], b))
    ):
        case Success((found, params, base)):
            pass
        case failure:
            return failure
    target = dtype or _default_dtype(directory, config)
    quant = None if dequantize else quantization.describe(base.layers)
    match _engine(backend, base.needs_mlx or (fuse_base.mlx_quantizes(base.plan) if quant else "")):
        case Success(engine):
            pass
        case failure:
            return failure
    match _check_rows(directory, data, rows, int(config.get("vocab_size", 1 << 30))) if engine != "numpy" else Success([]):
        case Success(ids):
            pass
        case failure:
            return failure
    pairs = {p.removesuffix(".lora_a"): (a, *(params[p.removesuffix(".lora_a") + leaf] for leaf in (".lora_b", ".m")
                                              if p.removesuffix(".lora_a") + leaf in params))
             for p, a in params.items() if p.endswith(".lora_a")}  # (A, B), or DoRA's (A, B, m)
    log(f"Fusing into {target}{' (re-quantized: ' + quant.summary() + ')' if quant else ''}; checking with {engine} ...")
    dense = fuse_base.dense(base)
    exact = fusing.fuse_all(dense, pairs, found.scale)
    stored, base_stored = dtypes.cast_floats(exact, target), dtypes.cast_floats(dense, target)
    if quant is not None:
        stored = fuse_base.requantize(stored, base.tensors, base.plan, set(pairs))
        base_stored = fuse_base.requantize(base_stored, base.tensors, base.plan, set(pairs))  # the format's own noise
    check = _check(engine, config, ids, base, (dense, exact), (base_stored, stored), pairs, found.scale, quant, target)
    match fusing.verdict(check):
        case Failure(message):
            return Failure(f"refusing to write {output}: {message}")
    kind = config["model_type"]
    if quant is not None:  # mlx-lm's layout, as its own fuse writes a quantized model
        tensors, metadata = quantization.ours_to_mlx(kind, dtypes.cast_floats(stored, target)), "mlx"
    else:
        tensors = fusing.hf_tensors(kind, config, stored, base.stored) | dtypes.cast_floats(base.others, target)
        metadata = "pt"
    names = _write(output, directory, tensors, fusing.fused_config(config, target, quant), metadata,
                   max_shard_bytes, force, log)
    return Success(Fused(
        output=str(output), dtype=target, layers=len(pairs), files=names,
        size=sum(v.nbytes for v in tensors.values()), check=check, engine=engine,
        dequantized=bool(base.plan) and quant is None, quantization=quant.summary() if quant else "",
    ))


def _check(engine: str, config: dict, ids: list[list[int]], base: fuse_base.Base, computed: tuple[dict, dict],
           written: tuple[dict, dict], pairs: dict, scale: float, quant: Quant | None, target: str) -> fusing.Check:
    """The four models' logits (base, adapter, base as written, fused as written) compared; with
    no engine (`numpy`), the same four on the fused layers' weights.

    `computed`: the dense base and the exact fused weights (float32); `written`: the base and the
    fused model as they would be written. MLX runs quantized layers as stored; torch and NumPy use
    their dequantized weights (what a quantized layer multiplies by, in float32).
    """
    plan = base.plan if quant is not None else {}
    dense, exact = computed
    if engine == "numpy":  # layer by layer: one dequantized weight at a time
        def layers(tensors: dict, quantized: dict) -> Iterator[np.ndarray]:
            return (_layer(tensors, p, quantized) for p in pairs)

        return fusing.measure(layers(dense, {}), layers(exact, {}), *(layers(w, plan) for w in written), target,
                              quant.summary() if quant else "", on="weights")
    if engine == "mlx":
        plain, adapted, (cast, fused) = fuse_check.logits(engine, config, ids, base.tensors, base.plan, pairs,
                                                          scale, list(written), plan)
    else:
        plain, adapted, (cast, fused) = fuse_check.logits(engine, config, ids, dense, {}, pairs, scale,
                                                          (_float32(w, plan) for w in written), {})
    return fusing.measure(plain, adapted, cast, fused, target, quant.summary() if quant else "")


def _layer(tensors: dict, path: str, plan: dict) -> np.ndarray:
    """One module's weight as a model computes with it: float32, dequantized if `plan` quantizes it."""
    if path not in plan:
        return dtypes.as_float32(tensors[f"{path}.weight"])
    parts = {f"{path}.{leaf}": tensors[f"{path}.{leaf}"] for leaf in ("weight", "scales", "biases")}
    return fusing.dequantize(dtypes.cast_floats(parts, "float32"), {path: plan[path]})[f"{path}.weight"]


def _float32(tensors: dict, plan: dict) -> dict:
    """Written tensors as the float32 weights a model computes with (`plan`'s layers dequantized)."""
    return dtypes.cast_floats(fusing.dequantize(dtypes.cast_floats(tensors, "float32"), plan), "float32")


def _target(spec: str, revision: str, adapter: Path, output: Path, force: bool,
            any_architecture: bool = False) -> Result[tuple[Path, dict], str]:
    """The base's directory and config, after checking OUTPUT can be written (`any_architecture`:
    transformers' too, not only the registry's)."""
    from finetune.files.models import model_config

    if output.exists() and not output.is_dir():
        return Failure(f"{output}: exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not force:
        return Failure(f"{output}: already exists and is not empty; pass --force to replace it")
    match model_config(spec, revision, any_architecture):
        case Success((directory, config)):
            pass
        case failure:
            return failure
    for other in (directory, adapter):
        if other.exists() and output.resolve() == other.resolve():
            return Failure(f"{output}: is the {'model' if other == directory else 'adapter'} directory itself; choose another --output")
    return Success((directory, dict(config)))


def _engine(backend: str | None, needs_mlx: str) -> Result[str, str]:
    """Which engine runs the check: `--backend`'s choice, MLX where the base needs it, or `numpy`
    (the weights checked, no model run) where neither engine is installed."""
    import os

    from finetune.engines import choose

    requested = backend or os.environ.get("FT_BACKEND") or "auto"
    if not needs_mlx and requested == "auto" and not choose.installed("mlx") and not choose.torch_ready():
        return Success("numpy")  # no engine to run a model: the check measures the weights
    if not needs_mlx:
        engine = choose.decide(backend)[0]
        if engine == "torch":
            from finetune import engines

            engines.get("torch")  # before torch loads: idle OpenMP threads sleep, not spin
        return Success(engine)
    if not choose.installed("mlx"):
        return Failure(f"{needs_mlx}, and MLX is not installed here ({choose.INSTALL_MLX})")
    if requested == "torch":
        return Failure(f"--backend torch: {needs_mlx}; use --backend mlx")
    return Success("mlx")


def _write(output: Path, directory: Path, tensors: dict[str, np.ndarray], config: dict, metadata: str,
           max_shard_bytes: int, force: bool, log: Log) -> list[str]:
    """Config, weight shards (+ index) and the base's tokenizer files, as one rename."""
    from finetune.files.paths import write_dir

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
    from finetune.files.tokenizer import load_tokenizer

    texts = [PROMPT]
    if data is not None:
        from finetune.core.prepare import normalise_rows
        from finetune.files import datasets

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
