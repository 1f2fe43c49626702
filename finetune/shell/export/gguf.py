"""GGUF export: a HF model directory (a base, or one `ft fuse` just wrote) as one llama.cpp file.

config.json -> `<arch>.*` metadata (core.gguf), tokenizer files -> `tokenizer.ggml.*` (gguf_vocab),
HF tensors -> GGUF names with llama.cpp's Q/K row permutation (core.gguf), tied embeddings left tied
(no `output.weight`); norms and other 1-D tensors stay F32 as llama.cpp writes them. The file is
written with gguf's `GGUFWriter` to a temporary name in the output's folder, then renamed.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from msgspec import Struct
from returns.result import Failure, Result, Success

from finetune.core import dtypes
from finetune.core import gguf as core_gguf
from finetune.shell.export import outputs

Log = Callable[[str], None]
TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
EXPORTED = ("llama", "mistral", "qwen2")  # model types whose exports llama.cpp is tested to run
SOURCE = "gguf_source.json"  # beside a base converted from a GGUF file (the GGUF input's record)
_FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "bf16": 32}  # llama.cpp's LlamaFileType
_DROPPED = ("rotary_emb.inv_freq",)  # buffers some .bin checkpoints hold


class Written(Struct, frozen=True, kw_only=True):
    output: str
    gguf_type: str
    architecture: str
    tensors: int
    size: int  # bytes of the file
    notes: list[str] = []


def check_target(output: Path, force: bool, gguf_type: str = "f32") -> Result[Path, str]:
    """Refuse an output that cannot be written as one file (before anything is read or written)."""
    if gguf_type not in TYPES:
        return Failure(f"--gguf-type {gguf_type}: not supported (choose one of {', '.join(TYPES)})")
    if output.is_dir():
        return Failure(f"{output}: is a directory; --output names the .gguf file to write")
    if output.exists() and not force:
        return Failure(f"{output}: already exists; pass --force to replace it")
    return outputs.check_folder(output).map(lambda _: output)  # a missing folder is made when writing


def architecture(config: Mapping[str, Any], where: str) -> Result[str, str]:
    """The GGUF architecture of an HF config, or why it has none."""
    kind = config.get("model_type")
    if kind in EXPORTED:
        return Success(core_gguf.GGUF_ARCHITECTURES[kind])
    return Failure(f"{where}: model_type {kind!r} has no GGUF mapping (GGUF export supports {', '.join(EXPORTED)})")


def write_model(directory: Path, output: Path, gguf_type: str, *, name: str = "", force: bool = False,
                source: Path | None = None, log: Log = lambda _: None) -> Result[Written, str]:
    """Write the HF model in `directory` as the GGUF file `output` (tensors cast to `gguf_type`);
    `source`: the base's directory, where a base converted from GGUF keeps its original metadata."""
    from finetune.shell.export import fuse_base

    match check_target(output, force, gguf_type).bind(lambda _: _config(directory)):
        case Success(config):
            pass
        case failure:
            return failure
    match architecture(config, str(directory / "config.json")):
        case Success(arch):
            pass
        case failure:
            return failure
    match _metadata(directory, config, arch, source or directory):
        case Success((metadata, notes)):
            pass
        case failure:
            return failure
    match fuse_base.read_checkpoint(directory).bind(lambda raw: gguf_tensors(arch, config, raw, str(directory))):
        case Success(tensors):
            pass
        case failure:
            return failure
    window = config.get("sliding_window")
    if window and (config["model_type"] == "mistral" or config.get("use_sliding_window")) and window < config.get("max_position_embeddings", 0):
        notes = [*notes, f"llama.cpp's {arch} architecture attends without the sliding window of {window} tokens; longer contexts differ"]
    metadata = {"general.name": name or directory.name, **metadata,
                "general.file_type": _FILE_TYPES[gguf_type]}
    log(f"Writing {output} ({arch}, {gguf_type.upper()}, {len(tensors)} tensors) ...")
    size = write_file(output, arch, metadata, {k: encode(k, v, gguf_type) for k, v in tensors.items()})
    return Success(Written(output=str(output), gguf_type=gguf_type, architecture=arch, tensors=len(tensors),
                           size=size, notes=notes))


def _config(directory: Path) -> Result[dict[str, Any], str]:
    from finetune.files.sources import read_config

    return read_config(directory)


def _metadata(directory: Path, config: dict, arch: str, base: Path) -> Result[tuple[dict[str, Any], list[str]], str]:
    """Architecture and tokenizer metadata from config.json and the tokenizer files; where the base
    was converted from a GGUF file, that file's own metadata (and token arrays) take precedence."""
    from finetune.shell.export import gguf_vocab

    match gguf_vocab.metadata(directory, int(config["vocab_size"])):
        case Success((vocab, note)):
            fresh, notes = {**core_gguf.metadata_from_config(config), **vocab}, [note] if note else []
        case failure:
            return failure
    source = base / SOURCE
    if not source.is_file():
        return Success((fresh, notes))
    try:
        original = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return Failure(f"{source}: not valid JSON ({err})")
    kept = {k: v for k, v in (original.get("metadata") or {}).items()
            if not k.startswith(("GGUF.", "general.file_type", "general.quantization_version", "split."))}
    if kept.get("general.architecture") != arch:
        return Success((fresh, [*notes, f"{source}: the source GGUF's architecture differs; metadata from config.json"]))
    tokens, where = gguf_vocab.source_tokens(original)
    return Success(({**fresh, **kept, **tokens}, [f"metadata of {original.get('source', 'the source GGUF')} kept ({where})"]))


def gguf_tensors(arch: str, config: Mapping[str, Any], hf: Mapping[str, np.ndarray], where: str) -> Result[dict[str, np.ndarray], str]:
    """HF tensors under llama.cpp's names and layout (float32); a tied head is not written."""
    out = {}
    for name, w in hf.items():
        if name.endswith(_DROPPED) or (name == "lm_head.weight" and config.get("tie_word_embeddings")):
            continue
        target = core_gguf.to_gguf_name(name, arch)
        if target is None:
            return Failure(f"{where}: tensor {name} has no GGUF name in a {arch} model")
        out[target] = core_gguf.to_gguf_tensor(arch, target, dtypes.as_float32(w), config)
    factors = core_gguf.llama3_rope_factors(config)
    if factors is not None:  # llama.cpp reads a Llama 3 rope's frequency divisors from a tensor
        out["rope_freqs.weight"] = factors
    return Success(out)


def encode(name: str, w: np.ndarray, gguf_type: str) -> tuple[np.ndarray, Any]:
    """(data, raw GGML type) of one tensor: 1-D tensors F32; 2-D at `gguf_type` (quantized rows whose
    length is not a multiple of the block size fall back to F16; Q4_0 keeps embeddings at Q8_0)."""
    import gguf

    kind = gguf.GGMLQuantizationType
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim < 2 or gguf_type == "f32":
        return w, kind.F32
    if gguf_type == "f16":
        return w.astype(np.float16), kind.F16
    if gguf_type == "bf16":
        return gguf.quants.quantize(w, kind.BF16), kind.BF16
    qtype = kind.Q8_0 if gguf_type == "q8_0" or name in ("token_embd.weight", "output.weight") else kind.Q4_0
    if w.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return w.astype(np.float16), kind.F16
    return gguf.quants.quantize(w, qtype), qtype


def write_file(output: Path, arch: str, metadata: Mapping[str, Any], tensors: Mapping[str, tuple[np.ndarray, Any]]) -> int:
    """One GGUF file (metadata in order, then tensors), to a temporary name beside `output`, renamed."""
    import gguf

    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        for key, value in metadata.items():
            if key not in ("general.architecture",):
                _add(writer, key, value)
        if any(t not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) for _, t in tensors.values()):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for name, (data, qtype) in tensors.items():
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return output.stat().st_size


_INT32_ARRAYS = ("tokenizer.ggml.token_type",)


def _add(writer: Any, key: str, value: Any) -> None:
    """One metadata entry, typed as llama.cpp reads it: ints UINT32, floats FLOAT32, token types INT32."""
    import gguf

    t = gguf.GGUFValueType
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, list | tuple):
        first = value[0] if value else ""
        sub = (t.INT32 if key in _INT32_ARRAYS or isinstance(first, int) and not isinstance(first, bool)
               else t.FLOAT32 if isinstance(first, float) else t.BOOL if isinstance(first, bool) else t.STRING)
        writer.add_key_value(key, list(value), t.ARRAY, sub_type=sub)
    else:
        raise TypeError(f"GGUF metadata {key}: unsupported value {type(value).__name__}")
