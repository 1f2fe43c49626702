"""`ft fuse`: merge a LoRA adapter into its base model, written as a HuggingFace model directory."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from returns.result import Failure, Success

from finetune.errors import UserError, unwrap


def fuse(
    model: str,
    /,
    *,
    adapter: Path,
    output: Path,
    dtype: Literal["float32", "float16", "bfloat16"] | None = None,
    dequantize: bool = False,
    data: str | None = None,
    rows: int = 4,
    max_shard_size: str = "2GB",
    force: bool = False,
    revision: str = "main",
    backend: Literal["auto", "mlx", "torch"] | None = None,
    format: Literal["hf", "gguf"] = "hf",
    gguf_type: str | None = None,
    ollama: bool = False,
) -> int:
    """Merge every LoRA pair into its base weight and write a complete HF model directory.

    The fused model's logits are checked against the adapter model's before anything is written:
    an adapter whose effect rounds away in the output dtype (or in re-quantization), or a fused
    model that disagrees beyond the dtype's tolerance, is refused (exit 2) and OUTPUT is left untouched.

    Parameters
    ----------
    model
        The base model: local HF-format directory, hub id (local cache first), or tiny.
    adapter
        Adapter directory: mlx-lm or FineTune (adapters.safetensors), a FineTune checkpoint, or PEFT.
    output
        Directory to write (config.json, safetensors shards, tokenizer files); must not exist or be empty.
    dtype
        Dtype of the written weights; default: the base checkpoint's own.
    dequantize
        Write float weights for a quantized base (default: quantized like the base, as mlx-lm does).
    data
        Dataset whose first rows the logit check uses (default: a fixed prompt).
    rows
        How many rows of --data the check uses.
    max_shard_size
        Largest weight file, e.g. 2GB or 500MB; bigger models get shards plus an index.
    force
        Replace a non-empty OUTPUT.
    revision
        Hub branch, tag or commit of MODEL.
    backend
        Engine whose libraries run the logit check: auto, mlx (our MLX modules) or torch (transformers); default: $FT_BACKEND, else auto (with neither installed: the check compares the fused layers' weights). Reading, fusing, re-quantizing and writing are NumPy either way (mxfp4/mxfp8/nvfp4 and 1-bit layers need MLX).
    format
        hf (a HF model directory) or gguf (one llama.cpp GGUF file; OUTPUT names the .gguf file).
    gguf_type
        GGUF tensor type: f32, f16, bf16, q8_0 or q4_0 (norms stay F32); default: the base's own dtype, Q4_0/Q8_0 for an MLX 4/8-bit base, a GGUF base's own type where writable (else f16).
    ollama
        With --format gguf: also write an Ollama Modelfile beside OUTPUT and print the ollama create line.
    """
    from finetune.core.fusing import parse_size
    from finetune.shell.export import outputs
    from finetune.shell.export.fuse import fuse as run

    if rows < 1:
        raise UserError(f"--rows must be at least 1, got {rows}")
    if not adapter.exists():
        raise UserError(f"{adapter}: no such adapter directory")
    if format == "gguf":
        from finetune.cli.export import fused_gguf

        if dtype or dequantize:
            raise UserError(f"--{'dtype' if dtype else 'dequantize'} applies to --format hf; a GGUF's precision is --gguf-type")
        return fused_gguf(model, adapter, output, gguf_type=gguf_type, data=data, rows=rows, force=force,
                          revision=revision, backend=backend, ollama=ollama)
    if gguf_type or ollama:
        raise UserError(f"--{'gguf-type' if gguf_type else 'ollama'} applies to --format gguf")
    unwrap(outputs.check_folder(output))  # a missing folder is made when writing
    match parse_size(max_shard_size):
        case Success(shard_bytes):
            pass
        case Failure(message):
            raise UserError(message)

    def log(line: str) -> None:
        print(line, file=sys.stderr)

    match run(model, adapter, output, dtype=dtype, dequantize=dequantize, data=data, rows=rows,
              max_shard_bytes=shard_bytes, force=force, revision=revision, backend=backend, log=log):
        case Success(done):
            pass
        case Failure(message):
            raise UserError(message)
    files = f"{len(done.files)} weight file{'s' if len(done.files) > 1 else ''}"
    if done.full:  # nothing fused: the trained weights written over the base
        print(f"Wrote the full fine-tune's {done.layers} trained weights over {model} into {done.output} "
              f"({done.dtype}; {files}, {done.size / 1e6:.1f} MB), as training wrote {adapter}/model")
        print(f"training moved them by up to {done.check.adapter_effect:.2e}; written in {done.dtype} they differ from "
              f"the trained values by at most {done.check.fused_vs_adapter:.2e}")
        return 0
    print(f"Fused {done.layers} LoRA layers into {done.output} ({done.dtype}"
          f"{', dequantized' if done.dequantized else ''}"
          f"{', quantized ' + done.quantization if done.quantization else ''}; {files}, {done.size / 1e6:.1f} MB)")
    how = "NumPy (neither MLX nor torch is installed to run the model)" if done.engine == "numpy" else done.engine
    print(f"{done.check.summary()}; checked with {how}")
    return 0
