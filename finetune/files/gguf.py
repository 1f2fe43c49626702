"""A llama.cpp `.gguf` file as MODEL: converted once into a cached HuggingFace-layout directory.

The file is read with llama.cpp's own reader (`gguf.GGUFReader`) and dequantized with
`gguf.quants`; names, config and the Q/K row order go through `finetune.core.gguf`. The directory
(config.json, model.safetensors in float32, tokenizer files built from the file's own
`tokenizer.ggml.*` metadata and chat template, and `gguf_source.json`) lives under
`$FINETUNE_HOME/models/gguf/<stem>-<key>/`, keyed on the file's path, size and mtime, so a changed
file converts again. Written to a temporary directory and renamed: readers never see half of it.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from returns.result import Failure, Result, Success

from finetune.core import gguf as mapping
from finetune.files.paths import build_dir, cache_root

FORMAT = 1  # bump when the converted layout changes: old caches are then rebuilt
DEQUANTIZED = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
# Tokenizer arrays: large, and kept in the tokenizer files rather than in gguf_source.json.
_TOKEN_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                 "tokenizer.ggml.merges", "tokenizer.ggml.precompiled_charsmap")


class GGUFError(Exception):
    """What is wrong with a GGUF file (the message names no file; callers add it)."""


def is_gguf(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".gguf"


def single_gguf(directory: Path) -> Path | None:
    """The one `.gguf` in a directory without config.json, else None."""
    if (directory / "config.json").exists():
        return None
    found = [p for p in directory.iterdir() if is_gguf(p)]
    return found[0] if len(found) == 1 else None


def cache_dir(path: Path) -> Path:
    """Where the conversion of `path` lives: keyed on its resolved path, size and mtime."""
    path = path.resolve()
    st = path.stat()
    key = hashlib.sha256(f"{FORMAT}\0{path}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "models" / "gguf" / f"{path.stem}-{key}"


def converted_dir(path: Path) -> Result[Path, str]:
    """The HF-layout directory of a GGUF file, converting it on first use (one-line Failure if bad)."""
    try:
        final = cache_dir(path)
        if (final / "config.json").is_file():
            return Success(final)
        source = read(path)
    except GGUFError as err:
        return Failure(f"{path}: {err}")
    except OSError as err:
        return Failure(f"{path}: cannot read ({err.strerror or err})")
    _announce(path)
    try:
        return Success(build_dir(final, lambda out: write(source, out)))
    except GGUFError as err:
        return Failure(f"{path}: {err}")
    except OSError as err:
        return Failure(f"{path}: cannot write its conversion under {final.parent} ({err.strerror or err})")


class Source:
    """What one GGUF file holds: metadata as Python values, tensors by name, the HF config."""

    def __init__(self, path: Path, reader: Any, metadata: dict[str, Any], config: dict[str, Any]):
        self.path, self.reader, self.metadata, self.config = path, reader, metadata, config
        self.arch = metadata["general.architecture"]


def _field_value(field: Any) -> Any:
    value = field.contents()
    return value.tolist() if isinstance(value, np.ndarray) else value


def read(path: Path) -> Source:
    """Parse and check a GGUF file (no tensor data is dequantized yet); raises GGUFError."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        metadata = {name: _field_value(f) for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    except ValueError as err:
        raise GGUFError(_reader_reason(str(err))) from None
    except (IndexError, KeyError, TypeError, OverflowError, EOFError) as err:  # what a cut or garbled header raises
        raise GGUFError(f"truncated or corrupt GGUF file ({type(err).__name__}: {err})") from None
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape.tolist())) for t in reader.tensors}
    for t in reader.tensors:
        if t.tensor_type.name not in DEQUANTIZED:
            raise GGUFError(f"tensor {t.name!r} has type {t.tensor_type.name}, which FineTune does not "
                            f"dequantize (supported: {', '.join(DEQUANTIZED)})")
    factors = next((_dequantize(t) for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    arch = metadata.get("general.architecture")
    config = mapping.config_from_metadata(metadata, shapes, factors)
    checked = config.bind(lambda c: mapping.check_tensors(arch, c, shapes))
    if isinstance(checked, Failure):
        raise GGUFError(checked.failure())
    return Source(path, reader, metadata, config.unwrap())


def _reader_reason(message: str) -> str:
    if "magic" in message.lower():
        return "not a GGUF file (wrong magic bytes; expected a llama.cpp .gguf)"
    if "GGMLQuantizationType" in message:
        return f"unknown tensor type ({message})"
    return f"truncated or corrupt GGUF file ({message})"


def _dequantize(tensor: Any) -> np.ndarray:
    from gguf.quants import dequantize

    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    try:
        out = dequantize(np.asarray(tensor.data), tensor.tensor_type)
    except (ValueError, AssertionError) as err:  # wrong byte count for the type and shape
        raise GGUFError(f"tensor {tensor.name!r}: data does not fit its type and shape ({err})") from None
    return np.asarray(out, np.float32).reshape(shape)


def hf_weights(source: Source, advance: Callable[[], None] = lambda: None) -> dict[str, np.ndarray]:
    """Every tensor dequantized to float32, under its HF name and in HF's layout."""
    out = {}
    for t in source.reader.tensors:
        advance()
        name = mapping.to_hf_name(t.name, source.arch)
        if name is None:  # llama.cpp-only tensors (rope_freqs) are read into the config instead
            continue
        out[name] = np.ascontiguousarray(mapping.to_hf_tensor(source.arch, t.name, _dequantize(t), source.config))
    return out


def write(source: Source, out: Path) -> None:
    """The HF-layout directory of `source` into the (empty, temporary) directory `out`."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    from safetensors.numpy import save_file

    progress = Progress(TextColumn("[bold]dequantize"), BarColumn(), MofNCompleteColumn(),
                        console=Console(file=sys.stderr), transient=True, disable=not sys.stderr.isatty())
    with progress:
        task = progress.add_task("dequantize", total=len(source.reader.tensors))
        weights = hf_weights(source, lambda: progress.advance(task))
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(source.config, indent=2) + "\n", encoding="utf-8")
    write_tokenizer(source.metadata, out)
    (out / "gguf_source.json").write_text(json.dumps(_provenance(source), indent=2) + "\n", encoding="utf-8")


def _provenance(source: Source) -> dict[str, Any]:
    digest = hashlib.sha256()
    with source.path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    st = source.path.stat()
    return {
        "source": str(source.path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
        "sha256": digest.hexdigest(), "format": FORMAT,
        "tensor_types": {t.name: t.tensor_type.name for t in source.reader.tensors},
        "metadata": {k: v for k, v in source.metadata.items() if k not in _TOKEN_ARRAYS},
    }


def write_tokenizer(metadata: Mapping[str, Any], out: Path) -> None:
    """Tokenizer files from `tokenizer.ggml.*` and `tokenizer.chat_template`, as transformers builds them."""
    from finetune.files.tokenizer import _quiet_transformers

    _quiet_transformers()
    from transformers import PreTrainedTokenizerFast

    try:
        from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    except ImportError:  # transformers 4.x kept them in integrations/ggml.py
        from transformers.integrations.ggml import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    if not isinstance(metadata.get("tokenizer.ggml.tokens"), list):
        raise GGUFError("no tokenizer in the metadata (tokenizer.ggml.tokens is missing)")
    grouped = {
        group: {name: metadata[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in metadata}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer, config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokenizer.get("tokenizer_type") == "llama":
        config.setdefault("add_bos_token", True)  # llama.cpp's default for sentencepiece files
    tokens = tokenizer["tokens"]
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        index = metadata.get(f"tokenizer.ggml.{key}")
        if isinstance(index, int) and not 0 <= index < len(tokens):
            raise GGUFError(f"tokenizer.ggml.{key}={index} is outside the {len(tokens)}-token vocabulary")
        config[name] = tokens[index] if isinstance(index, int) else None
    try:
        backend, extra = convert_gguf_tokenizer(metadata["general.architecture"], tokenizer)
    except (ValueError, KeyError) as err:
        raise GGUFError(f"cannot build its tokenizer ({err})") from None
    built = PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra)
    built.save_pretrained(str(out))


def _announce(path: Path) -> None:
    print(f"Converting {path.name} to a HuggingFace directory (once; cached)...", file=sys.stderr, flush=True)
