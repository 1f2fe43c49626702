"""`ft train ...` commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from cyclopts import Parameter

from finetune.errors import unwrap

FormatFlag = Literal["auto", "chat", "text", "completions", "instruction"]


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
) -> int:
    """Check a recipe or a dataset without training.

    Reports bad rows by file and line, token-length statistics, truncation, the share of
    supervised tokens, a memory estimate and recommendations. Exits 2 when anything is wrong.

    Parameters
    ----------
    target
        A recipe (.toml, .yaml) or a dataset: a bundled name, a .jsonl/.json file, or a directory with train/valid/test.jsonl.
    model
        Model whose tokenizer and config to check against: local dir, cached hub id, or tiny.
    template
        auto, plain, alpaca, chatml, llama2, llama3, tokenizer, a Jinja string or a file.
    format
        Force one row format instead of detecting each row's.
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
    """
    from finetune.shell import check, recipes, report

    is_recipe = Path(target).suffix in recipes.SUFFIXES
    flags = dict(model=model, template=template, format=format, max_seq_length=max_seq_length,
                 batch_size=batch_size, profile=profile, data=None if is_recipe else target)
    recipe = unwrap(recipes.load(target if is_recipe else None, flags))
    result = unwrap(check.run(recipe, available_gb=_available_gb()))
    if json:
        import msgspec

        print(msgspec.json.format(msgspec.json.encode(result)).decode())
    else:
        report.show_check(result, report.console(), max_errors=max_errors)
    return 0 if result.ok else 2


def list_data(*paths: str) -> int:
    """List bundled datasets, datasets in the current directory, and any PATHS given.

    Parameters
    ----------
    paths
        Extra dataset files or directories to describe.
    """
    from finetune.shell import catalog, report

    entries = unwrap(catalog.describe_all([Path(p) for p in paths], Path.cwd()))
    report.show_catalog(entries, report.console())
    return 0


def _available_gb() -> float:
    """Memory of the device training would use (system memory on CPU and Apple silicon)."""
    from finetune.shell import backend

    return backend.select(None).memory_gb * 1e9 / 1024**3



def start(
    model: str | None = None,
    data: str | None = None,
    /,
    *,
    recipe: str | None = None,
    template: str | None = None,
    format: FormatFlag | None = None,
    epochs: int | None = None,
    iters: int | None = None,
    batch_size: int | None = None,
    grad_accumulation: int | None = None,
    lora_rank: int | None = None,
    lora_scale: float | None = None,
    lora_alpha: float | None = None,
    lora_layers: int | None = None,
    learning_rate: float | None = None,
    max_seq_length: int | None = None,
    packing: bool | None = None,
    profile: Literal["none", "chat", "instruction", "code"] | None = None,
    seed: int | None = None,
    output: str | None = None,
    resume: bool = False,
    test: bool = False,
    device: Literal["cpu", "gpu"] | None = None,
) -> int:
    """Train LoRA adapters.

    Writes OUTPUT/adapters.safetensors and adapter_config.json (mlx-lm's format), recipe.toml,
    metrics.jsonl and checkpoints/. Flags override the recipe; positionals override its model/data.

    Parameters
    ----------
    model
        Local HF dir, hub id (local HF cache) or tiny.
    data
        Bundled dataset name, .jsonl/.json file, or directory with train/valid/test.jsonl.
    recipe
        TOML or YAML recipe to start from.
    template
        auto, plain, alpaca, chatml, llama2, llama3, tokenizer, a Jinja string or a file.
    format
        Force one row format instead of detecting each row's.
    epochs
        Passes over the training rows (instead of --iters).
    iters
        Optimizer steps (instead of --epochs).
    batch_size
        Rows per micro-batch.
    grad_accumulation
        Micro-batches per optimizer step (token-weighted).
    lora_rank
        Rank of the adapters.
    lora_scale
        Multiplier of the low-rank update (mlx-lm's scale).
    lora_alpha
        Alternative to --lora-scale: scale = alpha / rank.
    lora_layers
        Adapt the last N blocks (-1 = all).
    learning_rate
        Peak learning rate.
    max_seq_length
        Longest sequence in tokens; longer rows are truncated.
    packing
        Pack several rows per sequence with per-document attention.
    profile
        Defaults for chat, instruction or code data.
    seed
        Seed for LoRA init, batch order and dropout.
    output
        Run directory.
    resume
        Continue the run in OUTPUT from its latest checkpoint.
    test
        Report loss and perplexity on the test split at the end.
    device
        cpu or gpu (Metal or CUDA); default: a GPU when MLX has one, else the CPU.
    """
    from finetune.shell import recipes

    flags = dict(
        model=model, data=data, template=template, format=format, epochs=epochs, iters=iters,
        batch_size=batch_size, grad_accumulation=grad_accumulation, lora_rank=lora_rank,
        lora_scale=lora_scale, lora_alpha=lora_alpha, lora_layers=lora_layers,
        learning_rate=learning_rate, max_seq_length=max_seq_length, packing=packing,
        profile=profile, seed=seed, output=output,
    )
    r = unwrap(recipes.load(recipe, flags))
    outcome = _train(r, Path(r.output), resume, test, device=device)
    print(f"Adapters in {outcome.run_dir}: adapters.safetensors, adapter_config.json, recipe.toml, metrics.jsonl")
    return 0


def quick(
    model: str | None = None,
    data: str | None = None,
    /,
    *,
    iters: int | None = None,
    output: str | None = None,
    device: Literal["cpu", "gpu"] | None = None,
) -> int:
    """A short LoRA run with sensible defaults, then a sample before and after.

    No MODEL: the built-in tiny model (random weights, a pipeline demo). No DATA: the bundled
    SQL set. Each run gets a fresh directory under runs/.

    Parameters
    ----------
    model
        Local HF dir, hub id (local HF cache) or tiny.
    data
        Bundled dataset name, .jsonl/.json file, or directory with train/valid/test.jsonl.
    iters
        Optimizer steps (default: the quick recipe's).
    output
        Run directory (default: runs/quick, runs/quick-2, ...).
    device
        cpu or gpu (Metal or CUDA); default: a GPU when MLX has one, else the CPU.
    """
    from finetune.shell import recipes

    r = unwrap(recipes.load(recipes.bundled("quick"), dict(model=model, data=data, iters=iters, output=output)))
    run_dir = Path(r.output) if output else _fresh(Path(r.output))
    from finetune.shell import samples

    prepared = _prepare(r, device)
    before = samples.show(prepared, "Before training")
    outcome = _train(r, run_dir, False, False, prepared)
    samples.show(prepared, "After training", before)
    print(f"Adapters in {outcome.run_dir}. Try: ft generate {r.model.path} --adapter {outcome.run_dir} --prompt '...'")
    return 0


def _fresh(base: Path) -> Path:
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def _prepare(recipe, device: str | None = None):
    from finetune.shell import backend, run

    _log(backend.describe(backend.select(device)))
    return unwrap(run.prepare_run(recipe, _log))


def _train(recipe, run_dir: Path, resume: bool, test: bool, prepared=None, device: str | None = None):
    from finetune.shell import run

    unwrap(run.check_output(run_dir, resume))
    prepared = prepared or _prepare(recipe, device)
    return unwrap(run.train(prepared, run_dir, resume, _log, evaluate_test=test))


def _log(line: str) -> None:
    print(line, flush=True)
