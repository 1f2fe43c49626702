"""`ft export`: a run's adapter or fused model as GGUF (llama.cpp, Ollama) or PEFT."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Literal

from returns.result import Success

from finetune.errors import UserError, unwrap


def export(
    source: str,
    /,
    *,
    format: Literal["gguf-adapter", "gguf", "peft"],
    output: Path,
    model: str | None = None,
    gguf_type: str | None = None,
    ollama: bool = False,
    base_gguf: Path | None = None,
    force: bool = False,
    revision: str = "main",
    backend: Literal["auto", "mlx", "torch"] | None = None,
) -> int:
    """Write a run's adapter or fused model for llama.cpp and Ollama (GGUF) or for transformers + peft.

    Parameters
    ----------
    source
        A run or adapter directory; for --format gguf also a model alone (dir, hub id or tiny).
    format
        gguf-adapter (the LoRA adapter as a llama.cpp LoRA GGUF), gguf (the fused model, or a model alone, as one GGUF file) or peft (an adapter directory).
    output
        The .gguf file to write (a directory for peft).
    model
        The base model; default: the one the adapter names.
    gguf_type
        f32, f16, bf16, q8_0 or q4_0 for a model (default as ft fuse --format gguf); f32 (default) or f16 for an adapter.
    ollama
        Also write an Ollama Modelfile beside OUTPUT and print the ollama create line (gguf-adapter: the base GGUF is --base-gguf, else written beside OUTPUT).
    base_gguf
        With gguf-adapter --ollama: the base model's GGUF file that the Modelfile's FROM names.
    force
        Replace an existing OUTPUT.
    revision
        Hub branch, tag or commit of the base model.
    backend
        Engine that runs the fused model's logit check (--format gguf with an adapter): auto, mlx or torch.
    """
    if format == "peft":
        from finetune.cli.adapters import export as peft_export

        if gguf_type or ollama or base_gguf:
            raise UserError("--gguf-type, --ollama and --base-gguf apply to the GGUF formats")
        return peft_export(Path(source), format="peft", output=output, model=model, force=force)
    if format == "gguf-adapter":
        return adapter_gguf(Path(source), output, model=model, gguf_type=gguf_type or "f32", ollama=ollama,
                            base_gguf=base_gguf, force=force, revision=revision)
    from finetune.shell.export import adapters

    if adapters.is_full(source) and (Path(source) / "model").is_dir():  # a full fine-tune: its own HF model
        return base_gguf_file(str(Path(source) / "model"), output, gguf_type=gguf_type, force=force, revision=revision,
                              ollama=ollama)
    if isinstance(adapters.detect(source), Success):
        base = model or unwrap(adapters.load_any(source)).model
        return fused_gguf(base, Path(source), output, gguf_type=gguf_type, force=force, revision=revision,
                          backend=backend, ollama=ollama)
    return base_gguf_file(model or source, output, gguf_type=gguf_type, force=force, revision=revision, ollama=ollama)


def _log(line: str) -> None:
    print(line, file=sys.stderr)


def fused_gguf(model: str, adapter: Path, output: Path, *, gguf_type: str | None, force: bool, revision: str,
               backend: str | None, ollama: bool, data: str | None = None, rows: int = 4) -> int:
    """`ft fuse --format gguf` and `ft export RUN --format gguf`: fuse, check, write one GGUF file."""
    from finetune.shell.export.gguf_fuse import fuse_to_gguf

    done = unwrap(fuse_to_gguf(model, adapter, output, gguf_type=gguf_type, data=data, rows=rows, force=force,
                               revision=revision, backend=backend, log=_log))
    w = done.written
    print(f"Fused {done.layers} LoRA layers into {w.output} (GGUF {w.architecture}, {w.gguf_type.upper()}, "
          f"{w.tensors} tensors, {w.size / 1e6:.1f} MB; {done.how})")
    print(f"{done.check.summary()}; checked with {done.engine}")
    _notes(w.notes)
    if ollama:
        _modelfile(Path(w.output), None)
    return 0


def base_gguf_file(model: str, output: Path, *, gguf_type: str | None, force: bool, revision: str, ollama: bool) -> int:
    """A model alone (no adapter) as one GGUF file: the base for llama.cpp's `--lora`."""
    written = _write_base(model, output, gguf_type, force, revision)
    print(f"Wrote {written.output} (GGUF {written.architecture}, {written.gguf_type.upper()}, {written.tensors} tensors, "
          f"{written.size / 1e6:.1f} MB)")
    _notes(written.notes)
    if ollama:
        _modelfile(Path(written.output), None)
    return 0


def _write_base(model: str, output: Path, gguf_type: str | None, force: bool, revision: str):
    from finetune.core import quantization
    from finetune.files.models import model_config
    from finetune.shell.export import gguf as gguf_export
    from finetune.shell.export.gguf_fuse import choose_type

    directory, config = unwrap(gguf_export.check_target(output, force, gguf_type or "f32").bind(
        lambda _: model_config(model, revision)))
    unwrap(gguf_export.architecture(config, str(Path(directory) / "config.json")))
    if quantization.from_config(config).value_or(None) is not None:
        raise UserError(f"{model}: an MLX-quantized model; export it with an adapter (ft fuse {model} --adapter RUN "
                        "--format gguf), which dequantizes it")
    chosen, _ = choose_type(gguf_type, Path(directory), config, None)
    _log(f"Writing {model} as GGUF ...")
    return unwrap(gguf_export.write_model(Path(directory), output, chosen, name=Path(directory).name, force=force, log=_log))


def adapter_gguf(adapter: Path, output: Path, *, model: str | None, gguf_type: str, ollama: bool,
                 base_gguf: Path | None, force: bool, revision: str) -> int:
    """The LoRA adapter alone as a llama.cpp LoRA GGUF (+ Modelfile with FROM base, ADAPTER)."""
    from finetune.shell.export import adapters
    from finetune.shell.export.gguf_adapter import write_adapter

    if base_gguf is not None and not base_gguf.is_file():
        raise UserError(f"--base-gguf {base_gguf}: no such file")
    written = unwrap(write_adapter(adapter, output, model=model, gguf_type=gguf_type, force=force, revision=revision))
    print(f"Wrote llama.cpp LoRA adapter {written.output} ({written.architecture}, {written.pairs} pairs, "
          f"rank {written.rank}, alpha {written.alpha:g}, {written.size / 1e6:.2f} MB)")
    if not ollama:
        return 0
    if base_gguf is None:
        base = model or unwrap(adapters.load_any(adapter)).model
        base_gguf = output.with_name(f"{output.stem}-base.gguf")
        w = _write_base(base, base_gguf, None, force, revision)
        print(f"Wrote the base {w.output} for the Modelfile's FROM ({w.gguf_type.upper()}, {w.size / 1e6:.1f} MB)")
    _modelfile(base_gguf, output)
    return 0


def _notes(notes: list[str]) -> None:
    for note in notes:
        print(f"note: {note}", file=sys.stderr)


def _modelfile(model: Path, adapter: Path | None) -> None:
    """Write the Modelfile (chat template and EOS read back from the model GGUF) and say how to use it."""
    from finetune.shell.export import ollama

    template, eos = _template_and_eos(model)
    path, translated = ollama.write(model, adapter, template, eos)
    if template and not translated.kind:
        print(f"note: the chat template is not ChatML or Llama 3 shaped ({', '.join(ollama.TEMPLATES)} are "
              "translated); the Modelfile has no TEMPLATE and Ollama falls back to the GGUF's own", file=sys.stderr)
    name = re.sub(r"[^a-z0-9._-]+", "-", (adapter or model).stem.lower()).strip("-") or "finetune"
    print(f"Wrote {path}{' (' + translated.kind + ' template)' if translated.kind else ''}; to use it: "
          f"ollama create {name} -f {path}")


def _template_and_eos(model: Path) -> tuple[str | None, str]:
    """The chat template and EOS token text of a GGUF file, read with gguf's reader."""
    import gguf

    try:
        reader = gguf.GGUFReader(model)
    except (OSError, ValueError) as err:
        raise UserError(f"{model}: cannot read it as GGUF ({err})") from err

    def value(key: str):
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    template, eos, tokens = value("tokenizer.chat_template"), value("tokenizer.ggml.eos_token_id"), None
    if isinstance(eos, int):
        field = reader.fields.get("tokenizer.ggml.tokens")
        tokens = field.contents(eos) if field is not None else None
    return template, tokens if isinstance(tokens, str) else ""


