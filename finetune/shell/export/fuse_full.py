"""A full fine-tune's HuggingFace model: the base checkpoint with the run's trained block weights
in their place, written by `ft fuse`'s writer (HF names, the base's dtype, tokenizer and
generation files, one rename). Training writes it to RUN/model; `ft fuse BASE --adapter RUN` writes
the same model anywhere. NumPy only: nothing is fused, so no model runs; the check compares weights.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from returns.result import Failure, Result, Success

from finetune.core import adapters as core_adapters
from finetune.core import architectures, dtypes, full, fusing, quantization
from finetune.files.adapters import load_any
from finetune.shell.export import fuse, fuse_base

Log = Callable[[str], None]
FOLDER = "model"  # RUN/model: the run's HuggingFace model


def write(model_spec: str, run: Path, output: Path, *, dtype: str | None = None, max_shard_bytes: int = 2_000_000_000,
          force: bool = False, revision: str = "main", log: Log = lambda _: None) -> Result[fuse.Fused, str]:
    """`run`'s trained weights over `model_spec`'s checkpoint, written to `output` as a HF model."""
    from finetune.core.convert import other_parts

    match fuse._target(model_spec, revision, run, output, force, any_architecture=True):
        case Success((directory, config)):
            pass
        case failure:
            return failure
    kind = config["model_type"]
    if quantization.from_config(config).value_or(None) is not None:
        return Failure(f"{model_spec}: a quantized checkpoint; a full fine-tune's weights go over its float original")
    match load_any(run, full=True):
        case Success(adapter) if adapter.spec is not None and adapter.spec.fine_tune_type == "full":
            pass
        case Success(_):
            return Failure(f"{run}: not a full fine-tune (adapter_config.json's fine_tune_type is not 'full')")
        case failure:
            return failure
    match over_base(directory, config, adapter, model_spec):
        case Success((raw, base, trained)):
            pass
        case failure:
            return failure
    target = dtype or fuse._default_dtype(directory, config)
    log(f"Writing {run}'s {len(trained)} trained weights over {model_spec} in {target} ...")
    before = dtypes.cast_floats({k: base[k] for k in trained}, "float32")
    after = dtypes.cast_floats(trained, "float32")
    written_before, written = dtypes.cast_floats(before, target), dtypes.cast_floats(after, target)
    check = fusing.measure(before.values(), after.values(), written_before.values(), written.values(), target, on="weights")
    merged = dtypes.cast_floats({**base, **trained}, target)
    if kind not in architectures.REGISTRY:
        tensors = merged
    else:
        tensors = fusing.hf_tensors(kind, config, merged, tuple(raw)) | dtypes.cast_floats(other_parts(kind, raw), target)
    names = fuse._write(output, directory, tensors, fusing.fused_config(config, target), "pt", max_shard_bytes, force, log)
    return Success(fuse.Fused(output=str(output), dtype=target, layers=len(trained), files=names,
                              size=sum(v.nbytes for v in tensors.values()), check=check, engine="numpy", full=True))


def over_base(directory: Path, config: dict, adapter, model_spec: str) -> Result[tuple[dict, dict, dict], str]:
    """(the checkpoint as stored, the base in the trained weights' naming, the trained weights), the
    trained ones checked against the base (names, shapes); else the first mismatch in one line."""
    from finetune.core.convert import hf_to_mlx

    match fuse_base.read_checkpoint(directory):
        case Success(raw):
            pass
        case failure:
            return failure
    kind = config["model_type"]
    stored = core_adapters.to_file_keys(adapter.params, adapter.kind)
    if kind not in architectures.REGISTRY:  # the torch engine's: trained and stored under transformers' names
        base, trained = dict(raw), dict(stored)
        prefix = next((p[0] for p in map(core_adapters.split_path, trained) if p), "")
    else:
        match hf_to_mlx(kind, config, raw):
            case Success(base):
                pass
            case Failure(message):
                return Failure(f"{model_spec}: {message}")
        prefix = architectures.REGISTRY[kind].blocks
        trained = core_adapters.from_file_keys(stored, architectures.family_of_blocks(prefix).family)
    shapes = {k: tuple(v.shape) for k, v in base.items()}
    return full.check_weights(trained, shapes, prefix, str(adapter.weights_path),
                              dict(zip(trained, stored, strict=True))).map(lambda _: (raw, base, trained))
