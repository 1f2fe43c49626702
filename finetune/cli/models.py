"""`ft models ...` commands."""

from __future__ import annotations

from typing import Literal

from returns.result import Failure, Success

from finetune.errors import UserError


def _size(n: int) -> str:
    if n <= 0:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):  # powers of 10, as every size FineTune prints
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def list_models(*, json: bool = False) -> int:
    """List the built-in tiny model, converted caches, .gguf files used as MODEL and HF-cache models.

    A .gguf file is listed with its float32 conversion (size and folder); the HF cache shows the
    supported models it holds.

    Parameters
    ----------
    json
        Print the rows as JSON instead of a table.
    """
    from rich.table import Table

    from finetune.shell.data import report
    from finetune.shell.models import inventory

    rows = inventory.list_models()
    if json:
        import msgspec

        print(msgspec.json.format(msgspec.json.encode(rows)).decode())
        return 0
    table = Table(title="Models", title_justify="left")
    table.add_column("name", overflow="fold")
    for column in ("architecture", "parameters", "dtype", "size", "where"):
        justify = "right" if column in ("parameters", "size") else "left"
        table.add_column(column, justify=justify, no_wrap=True)
    for r in rows:
        cells = (r.name, r.architecture, _count(r.parameters), r.dtype, _size(r.size), r.kind)
        table.add_row(*cells)
    out = report.console()
    out.print(table)
    for r in rows:  # full paths below the table, where no terminal width cuts them
        out.print(
            f"{r.name} ({r.kind}): {r.where}" + (f"  [{r.note}]" if r.note else ""), markup=False
        )
    return 0


def info(
    model: str,
    /,
    *,
    revision: str = "main",
    load: bool = False,
    json: bool = False,
    backend: Literal["auto", "mlx", "torch"] | None = None,
) -> int:
    """Describe a model: architecture, sizes, dtype, chat template and a LoRA memory estimate.

    Parameters
    ----------
    model
        Local HF-format directory, hub id (local cache first), or tiny.
    revision
        Hub branch, tag or commit.
    load
        Also load the weights (reads every file, fills the converted cache) and time it.
    json
        Print the description as JSON instead of text.
    backend
        Engine to describe loading and training with: mlx, torch (transformers) or auto (default; $FT_BACKEND).
    """
    from rich.markup import escape

    from finetune.engines import choose
    from finetune.shell.data import report

    engine, why = choose.for_model(backend, model, revision)  # refuses a quantized base under torch
    if engine == "torch":
        found, loaded, computes = _torch_info(model, revision, load, why)
    else:
        found, loaded = _mlx_info(model, revision, load)
        computes = f"computes in {found.load_dtype} on this {found.device.upper()}"
    if json:
        import msgspec

        print(msgspec.json.format(msgspec.json.encode(found)).decode())
        return 0
    f, m = found.facts, found.memory
    lines = [
        ("model", found.name + (f"  [{found.note}]" if found.note else "")),
        ("directory", found.directory),
        ("architecture", f.model_type),
        ("engines", _engines(f.model_type)),
        ("layers", str(f.num_layers)),
        ("hidden size", str(f.hidden_size)),
        ("attention heads", f"{f.num_heads} (kv heads {f.num_kv_heads}, head dim {f.head_dim})"),
        ("intermediate size", str(f.intermediate_size)),
        ("vocabulary", f"{f.vocab_size:,}"),
        ("context length", f"{f.context_length:,}"),
        ("tied embeddings", "yes" if f.tied_embeddings else "no"),
        ("parameters", f"{found.parameters:,} ({_count(found.parameters)})"),
        ("dtype", f"{found.dtype} ({computes}; LoRA, optimizer and loss in float32)"),
        ("quantization", found.quantization or "none (float weights)"),
        ("size on disk", _size(found.size)),
        ("chat template", "yes" if found.chat_template else "no"),
        (
            "LoRA memory",
            f"{m.total_gb:.2f} GB at the default recipe (weights {m.weights_gb:.2f}, "
            f"adapters+optimizer {m.lora_gb:.2f}, activations {m.activations_gb:.2f}; "
            f"{m.trainable:,} trainable)" + ("; MLX-CPU's fitted activation copies at the torch dtype, "
                                              "not fitted to torch, whose peaks run higher" if engine == "torch" else ""),
        ),
        ("converted cache", ", ".join(found.converted) or "none"),
    ]
    if loaded:
        lines.append(("load", loaded))
    out = report.console()
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        out.print(f"[bold]{key:<{width}}[/bold]  {escape(value)}")
    return 0


def _engines(model_type: str) -> str:
    """The engines that can train this architecture: MLX with a registry row, torch where
    transformers has a causal LM for it (and the torch extra is installed)."""
    import importlib.util

    from finetune.core import architectures

    names = ["mlx"] if model_type in architectures.REGISTRY else []
    if all(importlib.util.find_spec(m) for m in ("torch", "peft", "transformers")):
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        names += ["torch"] if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else []
    if not names:
        return f"none (no MLX row for {model_type}, and transformers has no causal LM for it)"
    if "mlx" not in names:
        return f"torch (the MLX engine has no {model_type} row)"
    return ", ".join(names) + ("" if "torch" in names else " (torch: pip install the torch extra)")


def _mlx_info(model: str, revision: str, load: bool):
    """inventory.info where MLX computes; `--load` first, so the description lists the cache entry it fills."""
    import time

    from finetune.shell.models import inventory

    loaded = ""
    if load:
        from finetune import engines

        start = time.perf_counter()
        match engines.get("mlx").load(model, revision=revision):
            case Failure(message):
                raise UserError(message)
        loaded = f"loaded in {time.perf_counter() - start:.2f} s"
    match inventory.info(model, revision):
        case Success(found):
            return found, loaded
        case Failure(message):
            raise UserError(message)
    raise AssertionError("unreachable")


def _torch_info(model: str, revision: str, load: bool, why: str):
    """inventory.info for the torch engine: its device, the dtype it trains in, the estimate at that
    dtype; `--load` reads the weights through transformers (AutoModelForCausalLM) and times it."""
    import sys
    import time

    import msgspec

    from finetune import engines
    from finetune.core import memory
    from finetune.core.config import Recipe
    from finetune.shell.models import inventory

    torch = engines.get("torch")
    name, where = torch.train_dtype(Recipe().model.dtype, None), torch.device_kind(None)
    print(torch.device_line(None, Recipe().model.dtype, why)[0], file=sys.stderr)
    match inventory.info(model, revision, gpu=where != "cpu", engine="torch"):
        case Success(found):
            pass
        case Failure(message):
            raise UserError(message)
    found = msgspec.structs.replace(found, load_dtype=name, device=where,
                                    memory=memory.estimate(found.facts, Recipe(), dtype=name))
    loaded = ""
    if load:
        from pathlib import Path

        start = time.perf_counter()
        match torch.load_base(Path(found.directory), name, model):
            case Failure(message):
                raise UserError(message)
        loaded = f"loaded with transformers in {time.perf_counter() - start:.2f} s"
    return found, loaded, f"the torch engine trains with a {name} base on this {where.upper()}"
