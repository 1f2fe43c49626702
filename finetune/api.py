"""The Python training API: `finetune.train`, `finetune.validate`, with the CLI's checks and errors.

`ft train start` is `finetune.train` plus printing; both take every recipe field by its flag
name (`lora_rank=16`, `batch_size=8`, `data="sql"`), layered over an optional recipe file or
`Recipe`. Bad input raises `finetune.UserError` carrying the CLI's one-line message.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from msgspec import Struct

from finetune.core import flags as core_flags
from finetune.core import recipe as core_recipe
from finetune.core.config import Recipe
from finetune.errors import UserError, unwrap

Log = Callable[[str], None]


class Run(Struct, frozen=True, kw_only=True):
    """A finished (or resumed and finished) training run."""

    run_dir: Path
    recipe: Recipe  # the resolved recipe, as recipe.toml records it
    steps: int
    train_loss: float
    val_loss: float | None
    test_loss: float | None
    trainable: int  # LoRA parameters trained
    metrics: list[dict[str, Any]]  # the rows of metrics.jsonl
    plan: dict[str, Any]  # batches, rows and steps the run was planned with


def recipe_of(recipe: str | Path | Recipe | None = None, **overrides: Any) -> Recipe:
    """A recipe file (or `Recipe`, or nothing) with flag-named overrides on top, decoded once."""
    unknown = [k for k in overrides if k not in core_flags.BY_NAME]
    if unknown:
        names = list(core_flags.BY_NAME)
        close = difflib.get_close_matches(unknown[0], names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UserError(f"{unknown[0]!r} is not a recipe setting ({hint}see `ft train start --help`)")
    from finetune.shell import recipes

    if isinstance(recipe, Recipe):
        layers = [("recipe", core_recipe.to_builtins(recipe))]
        if overrides:
            layers.append(("arguments", core_flags.layer(overrides)))
        return unwrap(core_recipe.resolve(layers))
    return unwrap(recipes.load(recipe, overrides))


def validate(recipe: str | Path | Recipe | None = None, **overrides: Any):
    """Check a recipe and its data and model without training; returns validate's `ValidationReport`.

    `report.ok` is False when `ft train validate` would exit 2; `report.findings` say why.
    """
    from finetune.shell.data import check

    return unwrap(check.run(recipe_of(recipe, **overrides), available_gb=_available_gb()))


def train(
    recipe: str | Path | Recipe | None = None,
    *,
    output: str | Path | None = None,
    resume: bool = False,
    test: bool = False,
    device: str | None = None,
    backend: str | None = None,
    log: Log | None = None,
    memory_limit: float = 0.0,
    **overrides: Any,
) -> Run:
    """Train LoRA adapters as `ft train start` does; returns the `Run`.

    `output` (or the recipe's `output`) is the run directory; `resume` continues it; `test`
    evaluates the test split at the end; `device` is "cpu", "gpu" or None (the best one);
    `backend` is "mlx", "torch" or "auto" (None: `$FT_BACKEND`, else auto);
    `log` receives the progress lines (default: none); `memory_limit` is `--memory-limit` in GB
    (0: the device's budget).
    """
    resolved = recipe_of(recipe, **({"output": str(output)} if output else {}), **overrides)
    prepared = prepare(resolved, device, log or _quiet, backend, memory_limit)
    return run(prepared, Path(resolved.output), resume=resume, test=test, log=log or _quiet)


def prepare(recipe: Recipe, device: str | None, log: Log, engine: str | None = None, memory_limit: float = 0.0):
    """Select the engine and device, run validate's checks, load the model and attach fresh LoRA."""
    from finetune.engines import choose

    name, why = choose.for_model(engine, recipe.model.path, recipe.model.revision,
                                 quantize_bits=recipe.model.quantize_bits)
    _check_launcher(name, why)
    from finetune import engines
    from finetune.shell.training import run as training

    line, available = engines.get(name).device_line(device, recipe.model.dtype, why)  # GB, as every estimate
    log(line)
    return unwrap(training.prepare_run(recipe, log, engine=name, available_gb=available, device=device,
                                       memory_limit_gb=memory_limit))


def run(prepared, run_dir: Path, *, resume: bool, test: bool, log: Log) -> Run:
    """Train a prepared model into `run_dir` (refusing to overwrite a run unless resuming)."""
    from finetune.shell.training import run as training

    unwrap(training.check_output(run_dir, resume, prepared.engine))
    outcome = unwrap(training.fit(prepared, run_dir, resume, log, evaluate_test=test))
    metrics_file = run_dir / "metrics.jsonl"
    metrics = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()] if metrics_file.is_file() else []
    train_rows = len(prepared.splits["train"])
    plan = {
        "rows": train_rows,
        "batches": len(training.plan(prepared.splits["train"], prepared.recipe)),
        "steps": outcome.steps,
        "batch_size": prepared.recipe.train.batch_size,
        "grad_accumulation": prepared.recipe.train.grad_accumulation,
    }
    return Run(
        run_dir=Path(outcome.run_dir), recipe=prepared.recipe, steps=outcome.steps,
        train_loss=outcome.train_loss, val_loss=outcome.val_loss, test_loss=outcome.test_loss,
        trainable=outcome.trainable, metrics=metrics, plan=plan,
    )


def evaluate(model: Any, /, data: str | Path | None = None, adapters: Any = (), *, split: str = "test",
             limit: int | None = None, max_tokens: int = 0, metric: str = "exact", answer_after: str | None = None,
             stop: tuple[str, ...] = (), batch_size: int = 8, out: str | Path | None = None,
             backend: str | None = None, device: str | None = None, log: Log | None = None, **loaded: Any):
    """`ft eval` as a function: MODEL alone and with each adapter on DATA's `split`; returns the
    frozen `Evaluation` (one `Scores` per model: rows, exact, contains, loss, perplexity, seconds,
    tokens_per_second). `adapters` is one run/adapter directory or several; see `ft eval --help`.

    The older form `evaluate(run, split=..., model=loaded)` (no DATA) still returns the
    token-weighted loss of a run's adapters on a split of its recipe's data, as a float.
    """
    if data is None and (isinstance(model, Run) or (Path(str(model)) / "recipe.toml").is_file()):
        return run_loss(model, split, loaded.get("model"))
    if loaded:
        raise TypeError(f"evaluate() got unexpected keyword arguments {', '.join(sorted(loaded))}")
    if data is None:
        raise UserError(f"{model}: give the data to evaluate on (a bundled name, a file or a dataset directory)")
    from finetune.shell.evaluation import run as evaluation

    many = adapters if isinstance(adapters, list | tuple) else [adapters] if adapters else []
    names = [str(a.run_dir) if isinstance(a, Run) else str(a) for a in many]
    options = evaluation.Options(split=split, limit=limit, max_tokens=max_tokens, metric=metric,
                                 answer_after=answer_after, stop=tuple(stop), batch_size=batch_size,
                                 out=str(out or ""), backend=backend, device=device)
    return evaluation.evaluate(str(model), str(data), names, options, log or _quiet)


def run_loss(run: Run | str | Path, split: str = "test", model: Any = None) -> float:
    """Token-weighted loss of a run's adapters on one split of its recipe's data (perplexity: exp).

    `model` reuses an already loaded `finetune.load(..., adapter=run)` instead of loading again.
    """
    from finetune import engines
    from finetune.shell.data import check

    run_dir = run.run_dir if isinstance(run, Run) else Path(run)
    resolved = recipe_of(run_dir / "recipe.toml")
    inspection = unwrap(check.inspect(resolved))
    rows = inspection.tokens.get(split)
    if not rows:
        raise UserError(f"{resolved.data.path}: no {split} split with supervised rows to evaluate")
    mlx = engines.get("mlx")  # `finetune.load`'s engine
    if model is None:
        model, _ = unwrap(mlx.load(resolved.model.path, adapter=str(run_dir), revision=resolved.model.revision))
    return mlx.loss(model, rows, inspection.report.recipe)


def generate(model: Any, tokenizer: Any, prompt: str, *, max_tokens: int = 64, temp: float = 0.0,
             top_p: float = 1.0, seed: int = 0, template: str | None = None) -> str:
    """The model's continuation of `prompt` (raw text, or a user turn rendered with `template`)."""
    from finetune import engines
    from finetune.core import templates
    from finetune.shell.generation import build_prompt, decoder

    chosen = None
    if template is not None:
        chosen = unwrap(templates.choose(template, "chat", tokenizer.chat_template or ""))
    built = unwrap(build_prompt(tokenizer, text=prompt, template=chosen))
    ids = list(engines.get("mlx").generate(model, built.ids, max_tokens=max_tokens, temp=temp, top_p=top_p,
                                           seed=seed, stop_ids=built.stop_ids))
    return decoder(tokenizer)(ids)


def _available_gb() -> float:
    """Memory of the device training would use (system memory on the CPU and Apple silicon)."""
    from finetune import engines

    return engines.get("mlx").device_line(None, "auto", "")[1]


def _check_launcher(engine: str, why: str) -> None:
    """Ranks come from the engine's own launcher; under the other's, every rank would train the
    whole batch alone, so refuse."""
    import os

    from finetune.engines import choose

    if engine == "torch" and choose.launched_by_mlx():
        raise UserError(f"the torch engine ({why}) under mlx.launch: mlx.launch starts the MLX engine's ranks "
                        "(--backend mlx); start the torch engine's with torchrun")
    if engine == "mlx" and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise UserError(f"the MLX engine ({why}) under torchrun (WORLD_SIZE={os.environ['WORLD_SIZE']}): torchrun starts "
                        "the torch engine's ranks (add --backend torch); start the MLX engine's with mlx.launch")


def _quiet(line: str) -> None:
    del line


__all__ = ["Run", "evaluate", "generate", "recipe_of", "run_loss", "train", "validate"]
