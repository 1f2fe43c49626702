"""`ft train start|quick` on either engine: a recipe in, a run directory out (adapters in mlx-lm's
format, recipe.toml, metrics.jsonl, checkpoints with the optimizer state, plan.json)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
from returns.result import Failure, Result, Success

from finetune import engines
from finetune.core.config import Recipe
from finetune.engines.protocol import Data, Prepared, PrepareOptions, Trainer, World, plan
from finetune.shell import recipes
from finetune.shell.data import check, report
from finetune.shell.evaluation import training as exact_match
from finetune.shell.export import adapters
from finetune.shell.training import checkpoints, loop, ranks, rundir
from finetune.shell.training.rundir import (
    Cursor,
    Outcome,
    fingerprint,
    first_difference,
    total_steps,
)

Log = Callable[[str], None]
__all__ = ["Prepared", "check_output", "fit", "plan", "prepare_run"]


def prepare_run(recipe: Recipe, log: Log, engine: str = "mlx", available_gb: float = 0.0, device: str | None = None,
                memory_limit_gb: float = 0.0) -> Result[Prepared, str]:
    """Run validate's checks (before any weight loads), then let the engine plan the memory, load
    the model and attach fresh adapters.

    Errors stop here with validate's message; warnings are logged. The prepared recipe is the
    resolved one (model-dependent defaults filled in), which is what recipe.toml records.
    """
    chosen = engines.get(engine)
    match chosen.join(recipe, device):  # before validate reads anything: ranks above 0 print nothing
        case Failure(message):
            return Failure(message)
    match check.before_training(recipe, available_gb, log, engine=engine):
        case Success(inspection):
            pass
        case Failure(message):
            return Failure(message)
    splits = {k: v for k, v in inspection.tokens.items() if v}
    options = PrepareOptions(device=device, available_gb=available_gb, memory_limit_gb=memory_limit_gb)
    return chosen.prepare(inspection.report.recipe, inspection.report.facts, splits, inspection.tokenizer, options, log)


def fit(prepared: Prepared, run_dir: Path, resume: bool, log: Log, evaluate_test: bool = False) -> Result[Outcome, str]:
    """Train (or continue) in `run_dir`; every file lands atomically. Rank 0 alone writes and logs."""
    engine = engines.get(prepared.engine)
    recipe, world = prepared.recipe, prepared.world
    cfg = recipe.train
    match _join(engine, prepared):
        case Failure(message):
            return Failure(message)
    lead = world.rank == 0
    log = log if lead else (lambda line: None)
    scorer = exact_match.exact_match(prepared, log) if lead else None  # before anything is written
    train_data = Data(prepared.splits["train"], plan(prepared.splits["train"], recipe))
    valid = prepared.splits.get("valid")
    valid_data = Data(valid, plan(valid, recipe)) if valid else None
    steps = total_steps(recipe, len(train_data.plan))
    trainer = engine.trainer(prepared, steps)
    cursor = Cursor()
    metrics: list[dict[str, Any]] = []
    if resume:  # rank 0 reads the checkpoint (other hosts have none) and hands it to every rank
        restored = _restore(engine, trainer, prepared, run_dir, steps) if lead else Success((cursor, metrics))
        match ranks.all_ok(world, trainer.sum_values, restored):
            case Success((cursor, metrics)):
                cursor = _broadcast(trainer, cursor)
                log(f"Resuming at step {cursor.step} of {steps} from {run_dir}")
            case Failure(message):
                return Failure(message)
    elif lead:
        report.start_metrics(run_dir)
    if lead:
        recipes.save(recipe, run_dir / "recipe.toml")
    trainable, total = engine.count(prepared)
    rundir.log_start(log, trainable, total, steps, train_data, world, full=prepared.spec.fine_tune_type == "full")
    on_report = rundir.recorder(run_dir, metrics, world, log)

    def on_save(c: Cursor) -> None:
        if not lead:
            return
        params, opt = trainer.tensors()
        adapters.save(run_dir, params, prepared.spec, prepared.kind)  # mlx-lm's format, either engine
        state = {**msgspec.to_builtins(c), "total_steps": steps, "recipe": fingerprint(recipe),
                 "metrics": len(metrics), **({} if prepared.engine == "mlx" else {"engine": prepared.engine})}
        checkpoints.save(run_dir, c.step, params, opt, state, cfg.keep_checkpoints)

    planned = prepared.memory
    if planned and lead:
        engine.record_plan(prepared, run_dir)
    try:
        with _progress(steps, cursor.step) as advance, trainer.running(run_dir) as alive:
            cursor = loop.run_steps(
                trainer, train_data, valid_data, cfg, steps, cursor,
                on_report=lambda r: (on_report(r), advance(r)),
                on_save=on_save, on_step=lambda c: (alive(), advance(None)), on_log=log,
                splits=planned.splits if planned else 1, memory_limit_gb=planned.limit_gb if planned else 0.0,
                exact_match=scorer,
            )
            if planned and lead:
                engine.record_plan(prepared, run_dir, trainer.peak_gb())
    except rundir.Interrupted as stop:
        raise rundir.stopped(stop, run_dir) from None
    if lead and prepared.spec.fine_tune_type == "full":
        _write_model(recipe, run_dir, log)
    test_loss = None
    if evaluate_test and prepared.splits.get("test"):
        test = prepared.splits["test"]
        test_loss = trainer.evaluate(Data(test, plan(test, recipe)), cfg.max_seq_length, -1)
    return Success(rundir.finish(run_dir, cursor.step, metrics, trainable, test_loss, log))


def _write_model(recipe: Recipe, run_dir: Path, log: Log) -> None:
    """A full fine-tune's HuggingFace model in RUN/model: the base with the trained weights in place."""
    from finetune.shell.export import fuse_full

    out = run_dir / fuse_full.FOLDER
    match fuse_full.write(recipe.model.path, run_dir, out, force=True, revision=recipe.model.revision):
        case Success(done):
            log(f"Saved the fine-tuned model to {out} ({done.dtype}; transformers and mlx-lm load it)")
        case Failure(message):
            log(f"Note: no HuggingFace model written to {out}: {message}")


@contextmanager
def _progress(total: int, done: int) -> Iterator[Callable[[rundir.StepReport | None], None]]:
    """A rich progress bar on stderr (terminals only): step, loss, tokens/s, ETA."""
    from finetune.shell.progress import bars

    progress = bars()
    task = progress.add_task("train", total=total, completed=done, status="")

    def advance(report: rundir.StepReport | None) -> None:
        if report is None:
            progress.advance(task)
        else:
            progress.update(task, status=f"loss {report.train_loss:.3f}  {report.tokens_per_second:,.0f} tok/s")

    with progress:
        yield advance


def _restore(engine: Any, trainer: Trainer, prepared: Prepared, run_dir: Path,
             steps: int) -> Result[tuple[Cursor, list[dict]], str]:
    """Adapters, optimizer state and data cursor from the newest complete checkpoint.

    The random state needs no saving: the loop reseeds from (seed, step) before every step.
    """
    found = checkpoints.complete(run_dir)
    if not found:
        return Failure(f"{run_dir}: no checkpoint to resume from (checkpoints/ is empty or missing)")
    match checkpoints.load(found[-1], engine.read_tensors):
        case Success((state, params, opt)):
            pass
        case Failure(message):
            return Failure(message)
    source = found[-1]
    now = fingerprint(prepared.recipe)
    if state.get("recipe") != now:
        diff = first_difference(state.get("recipe", {}), now)
        return Failure(f"{source}: made with a different recipe ({diff}); resume with the same settings or start a new --output")
    if state.get("total_steps") not in (None, steps):
        print(f"Note: the run had {state['total_steps']} steps and now has a different length; the learning-rate schedule changes from here.")
    match trainer.restore(params, opt, source):
        case Failure(message):
            return Failure(message)
    cursor = Cursor(step=state["step"], batch_index=state["batch_index"], trained_tokens=state["trained_tokens"],
                    splits=state.get("splits", 1))
    return Success((cursor, report.metrics_until(run_dir, cursor.step)))


def _join(engine: Any, prepared: Prepared) -> Result[None, str]:
    """Before anything is written: every rank has the same recipe, data and model, and a row."""
    world = prepared.world
    if world.size == 1:
        return Success(None)
    digest = rundir.run_digest(prepared.recipe, prepared.splits, engine.shapes(prepared))
    return ranks.agree(world, lambda v: engine.sum_values(world, v), "the recipe, data or model", digest).bind(
        lambda _: rundir.check_world(world, prepared.recipe.train.batch_size))


def _broadcast(trainer: Trainer, cursor: Cursor) -> Cursor:
    """Rank 0's restored adapters, optimizer state and cursor on every rank."""
    world: World = trainer.world
    if world.size == 1:
        return cursor
    trainer.broadcast()
    numbers = [cursor.step, cursor.batch_index, cursor.trained_tokens] if world.rank == 0 else [0, 0, 0]
    step, batch_index, trained = (int(n) for n in trainer.sum_values(numbers))  # float64: exact
    return Cursor(step=step, batch_index=batch_index, trained_tokens=trained)


def check_output(run_dir: Path, resume: bool, engine: str = "mlx") -> Result[None, str]:
    """Refuse to overwrite a finished or started run unless resuming it (rank 0 decides; every
    rank stops with it, so none is left waiting in a collective)."""
    chosen = engines.get(engine)
    world = chosen.world()
    mine = rundir.check_output(run_dir, resume) if world.rank == 0 else Success(None)
    return ranks.all_ok(world, lambda v: chosen.sum_values(world, v), mine)
