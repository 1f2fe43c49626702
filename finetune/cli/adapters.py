"""`ft adapters ...`: convert adapters between mlx-lm and PEFT, and explain one."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from returns.result import Failure, Result

from finetune.errors import UserError, unwrap


def export(
    directory: Path,
    /,
    *,
    format: Literal["peft", "mlx-lm", "gguf-adapter"] = "peft",
    output: Path,
    base_model: str | None = None,
    model: str | None = None,
    force: bool = False,
) -> int:
    """Write an adapter in another format: PEFT (adapter_model.safetensors) or mlx-lm.

    Parameters
    ----------
    directory
        Adapter directory: mlx-lm or FineTune run (LoRA, DoRA or full), a FineTune checkpoint, or PEFT.
    format
        peft (for transformers + peft), mlx-lm (for mlx_lm and FineTune) or gguf-adapter (a llama.cpp LoRA GGUF file, as ft export writes it).
    output
        Directory to write; must not exist or be empty (gguf-adapter: the .gguf file).
    base_model
        base_model_name_or_path to record instead of the model the adapter names.
    model
        The base model (dir, hub id or tiny), to learn its layer count when a PEFT adapter skips layers.
    force
        Replace a non-empty OUTPUT.
    """
    from finetune.shell.export import adapters

    if format == "gguf-adapter":
        from finetune.cli.export import adapter_gguf

        return adapter_gguf(directory, output, model=model, gguf_type="f32", ollama=False, base_gguf=None,
                            force=force, revision="main")
    adapter = unwrap(adapters.load_any(directory))
    if format == "peft":
        if not base_model and adapter.model == "tiny":  # a name only FineTune knows: its directory
            from finetune.files.tiny import ensure_tiny

            base_model = str(ensure_tiny())
        tensors, config = adapters.peft_files(adapter, base_model or "")
    else:
        tensors, config = unwrap(adapters.mlx_files(adapter, _total_layers(model, adapter.model)))
        if base_model:
            config["model"] = base_model
    adapters.write_adapter(output, tensors, config, format, force)
    print(f"Wrote {adapters.FORMATS[format]} adapter {output} from {adapters.FORMATS[adapter.format]} {directory} "
          f"({len(tensors)} tensors, rank {adapter.rank}, scale {adapter.scale:g})")
    return 0


def import_(
    directory: Path,
    /,
    *,
    output: Path,
    model: str | None = None,
    force: bool = False,
) -> int:
    """Convert a PEFT LoRA adapter to mlx-lm's format (what ft and mlx_lm load).

    Parameters
    ----------
    directory
        PEFT adapter directory (adapter_config.json + adapter_model.safetensors).
    output
        Directory to write; must not exist or be empty.
    model
        The base model (dir, hub id or tiny), to learn its layer count when the adapter skips layers; default: the one the adapter names, when it is on this machine.
    force
        Replace a non-empty OUTPUT.
    """
    from finetune.shell.export import adapters

    fmt = unwrap(adapters.detect(directory))
    if fmt != "peft":
        raise UserError(f"{directory}: already a {adapters.FORMATS[fmt]} adapter, not PEFT (ft loads it as it is)")
    return export(directory, format="mlx-lm", output=output, model=model, force=force)


def inspect(directory: Path, /, *, model: str | None = None, json: bool = False) -> int:
    """Explain an adapter: format, rank, scale, targets, layers, size, base model; with --model, whether it fits.

    Parameters
    ----------
    directory
        Adapter directory: mlx-lm or FineTune run (LoRA, DoRA or full), a FineTune checkpoint, or PEFT.
    model
        A base model (dir, hub id or tiny) to check the tensor shapes against; exit 2 when they do not fit.
    json
        Print the description as JSON instead of text.
    """
    from finetune.core import adapters as core_adapters
    from finetune.core import dtypes as names
    from finetune.shell.data import report
    from finetune.shell.export import adapters

    full = adapters.is_full(directory)  # a full fine-tune: trained block weights, not LoRA factors
    adapter = unwrap(adapters.load_any(directory, full=full))
    layers, keys = core_adapters.layers_and_keys(core_adapters.paths_of(adapter.params))
    dtypes = sorted({names.name(v) for v in adapter.params.values()})
    rows: dict[str, Any] = {
        "format": adapters.FORMATS[adapter.format] + (", full fine-tune" if full else "")
        + (f" ({adapter.note})" if adapter.note else ""),
        "directory": str(adapter.directory),
        "weights": f"{adapter.weights_path} ({len(adapter.params)} tensors, {', '.join(dtypes)})",
        "base model": adapter.model or "(not named)",
    }
    if full:
        rows |= {"fine-tune type": "full (trained weights, not LoRA factors)", "trained": ", ".join(keys)}
    else:
        rows |= {"rank": adapter.rank, "scale": _scale(adapter), "dropout": adapter.dropout, "targets": ", ".join(keys)}
    rows["layers"] = f"{core_adapters.ranges(layers)} ({len(layers)} layers)" + _num_layers(adapter)
    rows["parameters"] = f"{sum(v.size for v in adapter.params.values()):,}"
    if full:
        from finetune.shell.export import fuse_full

        folder = Path(directory) / fuse_full.FOLDER
        rows["model folder"] = (f"{folder} (a HuggingFace model)" if (folder / "config.json").is_file()
                                else "(none: ft fuse BASE --adapter RUN writes one)")
    problem = None
    if model is not None:
        fit = _fit_full(adapter, model) if full else _fit(adapter, model)
        problem = fit.failure() if isinstance(fit, Failure) else None
        rows["fits " + model] = "no" if problem else "yes"
    if json:
        import json as json_

        print(json_.dumps({k.replace(" ", "_"): v for k, v in rows.items()}, indent=2))
    else:
        out = report.console()
        width = max(len(k) for k in rows)
        for key, value in rows.items():
            out.print(f"{key:<{width}}  {value}", markup=False)
    if problem:
        raise UserError(f"{directory} does not fit {model}: {problem}")
    return 0


def _scale(adapter) -> str:
    if adapter.peft is not None:
        how = "lora_alpha / √r (rsLoRA)" if adapter.peft.rslora else "lora_alpha / r"
        return f"{adapter.scale:g} = {how}, lora_alpha {adapter.peft.alpha:g}"
    return f"{adapter.scale:g} (as lora_alpha: {adapter.scale * adapter.rank:g})"


def _num_layers(adapter) -> str:
    if adapter.spec is None:
        return ""
    n = adapter.spec.num_layers
    return "; num_layers -1 (all)" if n < 0 else f"; num_layers {n} (the last {n})"


def _config(spec: str) -> Result[dict, str]:
    from finetune.files import sources

    return sources.model_dir(spec).bind(sources.read_config)


def _fit(adapter, model: str) -> Result[None, str]:
    """Whether the adapter's tensors fit `model`'s linear layers (from its config; no weights read)."""
    from finetune.shell.export import adapters

    return _config(model).bind(lambda config: adapters.fit(adapter, config)).map(lambda _: None)


def _fit_full(run, model: str) -> Result[None, str]:
    """Whether a full run's every trained tensor names a weight of `model` with its shape (the check ft fuse runs)."""
    from finetune.files import sources
    from finetune.shell.export import fuse_full

    return sources.model_dir(model).bind(lambda d: sources.read_config(d).bind(
        lambda config: fuse_full.over_base(d, config, run, model))).map(lambda _: None)


def _total_layers(model: str | None, named: str) -> int | None:
    """The base model's block count: from --model, else the named model when it is on this machine."""
    from finetune.core import modelinfo
    from finetune.files import sources

    if model is not None:
        return unwrap(_config(model).bind(modelinfo.facts)).num_layers
    if not named:
        return None
    if Path(named).expanduser().is_dir() or named == "tiny":
        found = _config(named)
    elif sources.is_hub_id(named) and (snapshot := sources.cached_snapshot(named)) is not None:
        found = sources.read_config(snapshot)
    else:
        return None
    return found.bind(modelinfo.facts).map(lambda f: f.num_layers).value_or(None)
