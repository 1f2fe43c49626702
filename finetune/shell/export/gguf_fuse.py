"""`ft fuse --format gguf`: fuse as `ft fuse` does (float32, its logit check), then write one GGUF.

The fused HF directory is a temporary folder beside the output, removed afterwards; the GGUF file
appears only complete (renamed). Which GGUF type is written, and whether that dequantizes or
re-quantizes the base, is decided here and said in `how`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from msgspec import Struct
from returns.result import Failure, Result, Success

from finetune.shell.export import gguf as gguf_export

Log = Callable[[str], None]
_BY_DTYPE = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
_GGML_FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
                    12: "Q3_K", 15: "Q4_K", 17: "Q5_K", 18: "Q6_K", 32: "BF16"}


class FusedGGUF(Struct, frozen=True, kw_only=True):
    written: gguf_export.Written
    layers: int  # LoRA pairs merged
    check: Any  # fusing.Check of the fused model against the adapter model
    engine: str
    how: str  # what happened to the base's precision


def fuse_to_gguf(model_spec: str, adapter: Path, output: Path, *, gguf_type: str | None = None,
                 data: str | None = None, rows: int = 4, force: bool = False, revision: str = "main",
                 backend: str | None = None, log: Log = lambda _: None) -> Result[FusedGGUF, str]:
    """Fuse `adapter` into `model_spec` and write the GGUF file `output`, or a one-line reason."""
    from finetune.files.models import model_config
    from finetune.shell.export.fuse import fuse

    match gguf_export.check_target(output, force, gguf_type or "f32").bind(lambda _: model_config(model_spec, revision)):
        case Success((directory, config)):
            config = dict(config)
        case failure:
            return failure
    match gguf_export.architecture(config, str(Path(directory) / "config.json")):
        case Failure(message):
            return Failure(message)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        match fuse(model_spec, adapter, tmp / "fused", dtype="float32", dequantize=True, data=data, rows=rows,
                   max_shard_bytes=1 << 62, revision=revision, backend=backend, log=log):
            case Success(done):
                pass
            case failure:
                return failure
        chosen, how = choose_type(gguf_type, Path(directory), config, adapter)
        name = f"{Path(directory).name}+{adapter.resolve().name}"
        written = gguf_export.write_model(tmp / "fused", output, chosen, name=name, force=force,
                                          source=Path(directory), log=log)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written.map(lambda w: FusedGGUF(written=w, layers=done.layers, check=done.check, engine=done.engine, how=how))


def choose_type(requested: str | None, directory: Path, config: Mapping[str, Any], adapter: Path | None) -> tuple[str, str]:
    """(GGUF type, what that does to the base): an MLX-quantized base re-quantized to Q4_0/Q8_0 by
    default, a base converted from a GGUF file back to its own type where gguf can write it (else F16),
    a float base at its own dtype."""
    from finetune.core import quantization
    from finetune.files import weights
    from finetune.shell.export import adapters

    quant = quantization.from_config(config).value_or(None)
    if quant is None and adapter is not None:
        record = adapters.base_quantization(adapter).value_or(None)
        quant = quantization.parse_block(record, "adapter").value_or(None) if record else None
    if quant is not None:
        default = "q4_0" if quant.bits <= 4 else "q8_0"
        chosen = requested or default
        was = f"MLX {quant.bits}-bit (group {quant.group_size}) base"
        if chosen in ("q4_0", "q8_0"):
            return chosen, f"{was} dequantized, fused in float32 and re-quantized to {chosen.upper()}"
        return chosen, f"{was} dequantized to {chosen.upper()}"
    source = _source_type(directory)
    if source:
        default = source.lower() if source.lower() in gguf_export.TYPES else "f16"
        chosen = requested or default
        verb = "kept at" if chosen == source.lower() else ("dequantized to" if chosen in ("f32", "f16", "bf16") else "re-quantized to")
        return chosen, f"source GGUF's {source} {verb} {chosen.upper()}"
    own = _BY_DTYPE.get(weights.checkpoint_dtype(directory) or config.get("torch_dtype") or "", "f32")
    chosen = requested or own
    verb = "quantized to" if chosen in ("q4_0", "q8_0") else "written as"
    return chosen, f"float base {verb} {chosen.upper()}"


def _source_type(directory: Path) -> str:
    """The main tensor type of the GGUF file a converted base came from ("" if none is recorded):
    the commonest type of its 2-D block weights, as gguf_source.json lists them."""
    from collections import Counter

    path = directory / gguf_export.SOURCE
    try:
        found = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return ""
    types = found.get("tensor_types") or {}
    counts = Counter(t for name, t in types.items() if name.startswith("blk.") and not name.endswith(("norm.weight", ".bias")))
    if counts:
        return str(counts.most_common(1)[0][0])
    file_type = (found.get("metadata") or {}).get("general.file_type")
    return _GGML_FILE_TYPES.get(file_type, "") if isinstance(file_type, int) else ""
