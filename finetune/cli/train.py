"""`ft train ...` commands."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Literal

from cyclopts import Parameter

from finetune.core.config import DataFormat as FormatFlag
from finetune.errors import UserError, unwrap


def validate(
    target: str,
    /,
    *,
    model: str | None = None,
    template: str | None = None,
    format: FormatFlag | None = None,
    max_seq_length: int | None = None,
    batch_size: int | None = None,
    profile: Literal["none", "chat", "instruction", "code"] | None = None,
    max_errors: Annotated[int, Parameter(name="--max-errors")] = 20,
    json: bool = False,
    show: int = 0,
    ids: bool = False,
    backend: Literal["auto", "mlx", "torch"] | None = None,
) -> int:
    """Check a recipe or a dataset without training.

    Reports bad rows by file and line, token-length statistics, truncation, the share of
    supervised tokens, a memory estimate and recommendations. Exits 2 when anything is wrong.

    Parameters
    ----------
    target
        A recipe (.toml, .yaml) or a dataset: a bundled name, a .jsonl/.json file, or a directory with train/valid/test.jsonl.
    model
        Model whose tokenizer and config to check against: local dir, a .gguf file, cached hub id, or tiny.
    template
        auto, plain, alpaca, chatml, llama2, llama3, tokenizer, a Jinja string or a file.
    format
        Row format: auto (each row's by its keys), one format for every row, or mlx (mlx-lm's formats only: chat, completions, text, each row's by its keys; instruction rows refused).
    max_seq_length
        Longest sequence in tokens; longer rows are truncated.
    batch_size
        Rows per batch.
    profile
        Defaults for chat, instruction or code data.
    max_errors
        How many bad rows to list.
    json
        Print the report as JSON instead of tables.
    show
        Print the first N rows token by token as training sees them, supervised tokens marked (colour on a terminal, ⟦brackets⟧ otherwise).
    ids
        With --show, print each token's id after it.
    backend
        Engine the memory estimate is for: mlx, torch or auto (default; $FT_BACKEND), as train start would choose.
    """
    from finetune.shell import recipes
    from finetune.shell.data import report

    is_recipe = Path(target).suffix in recipes.SUFFIXES
    flags = dict(model=model, template=template, format=format, max_seq_length=max_seq_length,
                 batch_size=batch_size, profile=profile, data=None if is_recipe else target)
    if show < 0:
        raise UserError(f"--show {show}: give how many rows to print (0 or more)")
    if show and json:
        raise UserError("--show prints rows for people to read; leave out --json")
    recipe = unwrap(recipes.load(target if is_recipe else None, flags))
    inspection, note = _inspect(recipe, backend)
    result = inspection.report
    if json:
        import msgspec

        print(msgspec.json.format(msgspec.json.encode(result)).decode())
    else:
        if show > 0:
            _show_rows(result, inspection.tokenizer, show, ids)
        if note and result.estimate:
            print(note)
        report.show_check(result, report.console(), max_errors=max_errors)
    return 0 if result.ok else 2


def _inspect(recipe, backend: str | None):
    """validate's inspection with the chosen engine's memory estimate, and a note saying what it is.

    MLX: `core.memory` as fitted to MLX peaks, at the dtype MLX loads. torch: the same arithmetic
    at the dtype the torch engine trains in (bf16 where native); it was not fitted to torch's peaks.
    """
    import msgspec

    from finetune.engines import choose
    from finetune.shell.data import check

    engine, why = choose.for_model(backend, recipe.model.path, recipe.model.revision,
                                   quantize_bits=recipe.model.quantize_bits)
    if engine == "mlx":
        return unwrap(check.inspect(recipe, available_gb=_available_gb())), ""
    from finetune import engines

    torch = engines.get("torch")
    dtype = torch.train_dtype(recipe.model.dtype, None)
    line, available = torch.device_line(None, recipe.model.dtype, why)
    print(line, file=sys.stderr)
    as_torch = msgspec.structs.replace(recipe, model=msgspec.structs.replace(recipe.model, dtype=dtype))
    inspection = unwrap(check.inspect(as_torch, available_gb=available, engine="torch"))
    shown = msgspec.structs.replace(inspection.report.recipe, model=msgspec.structs.replace(
        inspection.report.recipe.model, dtype=recipe.model.dtype))  # the recipe as written, not as estimated
    note = (f"Memory estimate for the torch engine: base weights and activations in {dtype}, LoRA and AdamW "
            "in float32, with the activation copies fitted to MLX-CPU peaks; `ft train start` prints the torch "
            "engine's own estimate, fitted to its peaks.")
    return msgspec.structs.replace(inspection, report=msgspec.structs.replace(inspection.report, recipe=shown)), note


def _show_rows(result, tokenizer, n: int, ids: bool) -> None:
    """`--show N`: the first N rows token by token (the resolved recipe, the model's tokenizer)."""
    from finetune.shell.data import report, show

    out = report.console()
    if tokenizer is None:
        out.print("Cannot show rows: the model's tokenizer did not load (the findings below say why).")
        return
    show.show(show.gather(result.recipe, result.files, tokenizer, n), out, ids)


def list_data(*paths: str) -> int:
    """List bundled datasets, datasets in the current directory, and any PATHS given.

    Parameters
    ----------
    paths
        Extra dataset files or directories to describe.
    """
    from finetune.shell.data import catalog, report

    entries = unwrap(catalog.describe_all([Path(p) for p in paths], Path.cwd()))
    report.show_catalog(entries, report.console())
    return 0


def _available_gb() -> float:
    """Memory of the device training would use (system memory on CPU and Apple silicon)."""
    from finetune.api import _available_gb

    return _available_gb()


def start(
    model: str | None = None,
    data: str | None = None,
    *,
    recipe: str | None = None,
    resume: bool = False,
    test: bool = False,
    device: Literal["cpu", "gpu"] | None = None,
    backend: Literal["auto", "mlx", "torch"] | None = None,
    memory_limit: Annotated[float, Parameter(name="--memory-limit")] = 0.0,
    **settings,
) -> int:
    """Train LoRA adapters.

    Writes OUTPUT/adapters.safetensors and adapter_config.json (mlx-lm's format), recipe.toml,
    metrics.jsonl and checkpoints/. Runs validate's checks before loading weights. Every recipe
    field is a flag; flags override the recipe; MODEL and DATA override its model and data. The
    defaults shown are the built-in recipe's; a --recipe file's values replace them.

    Parameters
    ----------
    model
        Local HF dir, hub id (local HF cache) or tiny.
    data
        Bundled dataset name, .jsonl/.json file, or directory with train/valid/test.jsonl.
    recipe
        TOML or YAML recipe to start from.
    resume
        Continue the run in OUTPUT from its latest checkpoint.
    test
        Report loss and perplexity on the test split at the end.
    device
        cpu or gpu (Metal or CUDA); default: a GPU when MLX has one, else the CPU.
    backend
        Training engine: mlx, torch (transformers + peft) or auto (default; $FT_BACKEND).
    memory_limit
        GB (10^9 bytes) the run may use; planned before loading weights (micro-batches, checkpointing). 0: the RAM available now, or Metal's working set.
    """
    from finetune import api

    r = api.recipe_of(recipe, **_settings(settings, model=model, data=data))
    prepared = api.prepare(r, device, _log, backend, memory_limit)
    outcome = api.run(prepared, Path(r.output), resume=resume, test=test, log=_log)
    print(f"Adapters in {outcome.run_dir}: adapters.safetensors, adapter_config.json, recipe.toml, metrics.jsonl")
    return 0


def quick(
    model: str | None = None,
    data: str | None = None,
    *,
    device: Literal["cpu", "gpu"] | None = None,
    backend: Literal["auto", "mlx", "torch"] | None = None,
    memory_limit: Annotated[float, Parameter(name="--memory-limit")] = 0.0,
    **settings,
) -> int:
    """A short LoRA run with sensible defaults, then a sample before and after.

    No MODEL: the built-in tiny model (random weights, a pipeline demo). No DATA: the bundled
    SQL set. Each run gets a fresh directory under runs/ unless --output names one. Every recipe
    field is a flag over the quick recipe (recipes/quick.toml).

    Parameters
    ----------
    model
        Local HF dir, hub id (local HF cache) or tiny.
    data
        Bundled dataset name, .jsonl/.json file, or directory with train/valid/test.jsonl.
    device
        cpu or gpu (Metal or CUDA); default: a GPU when MLX has one, else the CPU.
    backend
        Training engine: mlx, torch (transformers + peft) or auto (default; $FT_BACKEND).
    memory_limit
        GB (10^9 bytes) the run may use; planned before loading weights (micro-batches, checkpointing). 0: the RAM available now, or Metal's working set.
    """
    from finetune import api
    from finetune.shell import recipes

    given = _settings(settings, model=model, data=data)
    r = api.recipe_of(recipes.bundled("quick"), **given)
    run_dir = Path(r.output) if "output" in given else _fresh(Path(r.output))
    prepared = api.prepare(r, device, _log, backend, memory_limit)
    from finetune.shell.training import samples

    before = samples.show(prepared, "Before training")
    outcome = api.run(prepared, run_dir, resume=False, test=False, log=_log)
    samples.show(prepared, "After training", before)
    print(f"Adapters in {outcome.run_dir}. Try: ft generate {r.model.path} --adapter {outcome.run_dir} --prompt '...'")
    return 0


def _settings(settings: dict, **positionals) -> dict:
    """Recipe flags given (None = not given); MODEL/DATA positionals win over --model/--data."""
    given = {k: v for k, v in settings.items() if v is not None}
    given.update({k: v for k, v in positionals.items() if v is not None})
    return given


def _with_recipe_flags(command, defaults=None, output: str = ""):
    """Give `command` (which takes **settings) one keyword flag per recipe field, from the Structs;
    each flag's help ends with its value in `defaults` (a Recipe; `output` words its output)."""
    import inspect

    from cyclopts import Parameter

    from finetune.core.flags import FLAGS

    own = [p for p in inspect.signature(command).parameters.values() if p.kind != p.VAR_KEYWORD]
    taken = {p.name for p in own}
    extra = []
    for flag in FLAGS:
        if flag.name in taken:
            continue
        names = [flag.option, *("--" + a.replace("_", "-") for a in flag.aliases)]
        shown = (output if flag.name == "output" and output else _default(defaults, flag.path)) if defaults else ""
        hint = Annotated[flag.kind | None, Parameter(name=names, help=f"{flag.help} [default: {shown}]" if shown else flag.help)]
        extra.append(inspect.Parameter(flag.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=hint))
    command.__signature__ = inspect.Signature(own + extra)
    command.__annotations__ = {**{p.name: p.annotation for p in own + extra}, "return": int}
    return command


def recipe(
    out: str,
    /,
    *,
    recipe: str | None = None,
    **settings,
) -> int:
    """Write a recipe file (TOML, or YAML for .yaml/.yml) from a recipe and flags, without training.

    Parameters
    ----------
    out
        The file to write: .toml, .yaml or .yml.
    recipe
        TOML or YAML recipe to start from.
    """
    from finetune import api
    from finetune.errors import UserError
    from finetune.shell import recipes

    if Path(out).suffix not in recipes.SUFFIXES:
        raise UserError(f"{out}: a recipe file must end in .toml, .yaml or .yml")
    written = recipes.save(api.recipe_of(recipe, **_settings(settings)), out)
    print(f"Wrote {written}")
    return 0


def _default(recipe, path: tuple[str, ...]) -> str:
    """A recipe field's value as a flag would spell it."""
    value = recipe
    for part in path:
        value = getattr(value, part)
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def _quick_recipe():
    from finetune.shell import recipes

    return unwrap(recipes.load(str(recipes.bundled("quick")), {}))


def _built_in_recipe():
    from finetune.core.config import Recipe

    return Recipe()


start = _with_recipe_flags(start, _built_in_recipe())
quick = _with_recipe_flags(quick, _quick_recipe(), output="runs/quick, or runs/quick-N when that exists")
recipe = _with_recipe_flags(recipe, _built_in_recipe())


def _fresh(base: Path) -> Path:
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def _log(line: str) -> None:
    print(line, flush=True)
