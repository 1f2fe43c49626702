"""`ft train start|quick`: a recipe in, a run directory out (adapters, recipe, metrics, checkpoints)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import msgspec
from mlx.utils import tree_flatten, tree_unflatten
from msgspec import Struct
from returns.result import Failure, Result, Success

from finetune.core import lora, memory, memplan, schedule
from finetune.core.adapters import AdapterSpec
from finetune.core.config import Recipe
from finetune.core.tokenize import Tokens
from finetune.engines import rundir
from finetune.engines.mlx import budget, distributed
from finetune.engines.mlx import lora as lora_modules
from finetune.engines.mlx import step as trainer
from finetune.engines.rundir import (  # engine-free, shared with the torch engine
    Outcome,
    fingerprint,
    first_difference,
    plan,  # noqa: F401  (callers use run.plan)
    total_steps,
)
from finetune.shell.data import check, report
from finetune.shell.evaluation import training as exact_match
from finetune.shell.export import adapters
from finetune.shell.training import checkpoints, recipes

Log = Callable[[str], None]


class Prepared(Struct):
    """A model with fresh (or restored) adapters, its data, and the settings to train it."""

    recipe: Recipe
    model: Any
    tokenizer: Any
    splits: dict[str, list[Tokens]]
    spec: AdapterSpec
    kind: str
    memory: memplan.MemoryPlan | None = None  # micro-steps and checkpointing against the limit


def prepare_run(recipe: Recipe, log: Log, available_gb: float = 0.0, memory_limit_gb: float = 0.0) -> Result[Prepared, str]:
    """Run validate's checks (before any weight loads), then load the model and add fresh LoRA.

    Errors stop here with validate's message; warnings are logged. The prepared recipe is the
    resolved one (model-dependent defaults filled in), which is what recipe.toml records.
    """
    from finetune.core import quantization
    from finetune.engines.mlx.load import load_model
    from finetune.engines.mlx.quantized import describe as describe_quantization

    match check.before_training(recipe, available_gb, log):
        case Success(inspection):
            pass
        case Failure(message):
            return Failure(message)
    recipe = inspection.report.recipe
    splits = {k: v for k, v in inspection.tokens.items() if v}
    planned = None
    if inspection.report.facts is not None:  # plan memory before any weight loads
        limit = memory_limit_gb or budget.device_budget_gb()
        ranks = distributed.setup().size  # each rank holds only its share of a batch: plan that
        share = msgspec.structs.replace(recipe.train, batch_size=-(-recipe.train.batch_size // ranks))
        match budget.plan(msgspec.structs.replace(recipe, train=share), inspection.report.facts, splits["train"], limit):
            case Success(planned):
                line = memplan.describe(planned)
                log(line if ranks == 1 else line.replace("memory plan:", f"memory plan, each of {ranks} ranks:", 1))
            case Failure(message):
                return Failure(message)
    log(f"Loading {recipe.model.path} ...")
    on_load = quantization.on_load(recipe.model.quantize_bits, recipe.model.quantize_group_size)
    match load_model(recipe.model.path, revision=recipe.model.revision, dtype=recipe.model.dtype, quantize=on_load):
        case Success((model, tok)):
            pass
        case Failure(message):
            return Failure(message)
    if base := describe_quantization(model):  # QLoRA: the base stays quantized, LoRA trains in float32
        log(f"Base quantized {'on load' if on_load else 'as stored'}: {base.summary()} (QLoRA)")
    block = lora_modules.block_linears(model)
    keys = lora.resolve_keys(recipe.lora.keys, block)
    unknown = [k for k in keys if k not in block]
    if unknown:
        return Failure(f"$.lora.keys: {', '.join(unknown)} not in this model's blocks; choose from all-linear, {', '.join(block)}")
    if recipe.lora.num_layers > len(model.layers):
        return Failure(f"$.lora.num_layers: {recipe.lora.num_layers} exceeds the model's {len(model.layers)} layers")
    layers = lora.select_layers(len(model.layers), recipe.lora.num_layers)
    shapes = lora_modules.linear_shapes(model, lora.targets(lora_modules.layers_prefix(model), layers, keys))
    params = {k: mx.array(v) for k, v in lora.init(recipe.train.seed, shapes, recipe.lora.rank).items()}
    lora_modules.attach(model, params, recipe.lora.scale, recipe.lora.dropout, dora=recipe.lora.fine_tune_type == "dora")
    spec = AdapterSpec(
        rank=recipe.lora.rank, scale=recipe.lora.scale, dropout=recipe.lora.dropout, keys=keys,
        num_layers=recipe.lora.num_layers, model=recipe.model.path, fine_tune_type=recipe.lora.fine_tune_type,
        base_quantization=quantization.record(base, on_load=on_load is not None, digest=_digest(model) if base else ""),
    )
    return Success(Prepared(recipe, model, tok, splits, spec, adapters.model_kind(model), planned))


def _digest(model) -> str:
    """The quantized base's identity, recorded in the adapter (`quantization.codes_digest`)."""
    from finetune.core.quantization import codes_digest
    from finetune.engines.mlx.quantized import codes

    return codes_digest(codes(model))


def fit(prepared: Prepared, run_dir: Path, resume: bool, log: Log, evaluate_test: bool = False) -> Result[Outcome, str]:
    """Train (or continue) in `run_dir`; every file lands atomically. Rank 0 alone writes and logs."""
    recipe, model = prepared.recipe, prepared.model
    cfg = recipe.train
    world = distributed.setup()
    match _join(prepared, world):
        case Failure(message):
            return Failure(message)
    lead = world.rank == 0
    log = log if lead else (lambda line: None)
    scorer = exact_match.exact_match(prepared, "mlx", log) if lead else None  # before anything is written
    train_data = trainer.Data(prepared.splits["train"], plan(prepared.splits["train"], recipe))
    valid = prepared.splits.get("valid")
    valid_data = trainer.Data(valid, plan(valid, recipe)) if valid else None
    steps = total_steps(recipe, len(train_data.plan))
    optimizer = _optimizer(recipe, steps)
    optimizer.init(model.trainable_parameters())
    mx.random.seed(cfg.seed)
    cursor = trainer.Cursor()
    metrics: list[dict[str, Any]] = []
    if resume:  # rank 0 reads the checkpoint (other hosts have none) and hands it to every rank
        restored = _restore(prepared, run_dir, optimizer) if lead else Success((cursor, metrics))
        match distributed.all_ok(world, restored):
            case Success((cursor, metrics)):
                cursor = _broadcast_state(model, optimizer, cursor, world)
                log(f"Resuming at step {cursor.step} of {steps} from {run_dir}")
            case Failure(message):
                return Failure(message)
    elif lead:
        report.start_metrics(run_dir)
    if lead:
        recipes.save(recipe, run_dir / "recipe.toml")
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    from finetune.engines.mlx.quantized import unpacked_parameters

    total = unpacked_parameters(model)  # a QLoRA base counts its weights, not its packed words
    rundir.log_start(log, trainable, total, steps, train_data, world)
    on_report = rundir.recorder(run_dir, metrics, world, log)

    def on_save(c: trainer.Cursor) -> None:
        if not lead:
            return
        params = trainer.flat_trainable(model)
        adapters.save(run_dir, params, prepared.spec, prepared.kind)
        state = {
            **msgspec.to_builtins(c),
            "total_steps": steps,
            "recipe": fingerprint(recipe),
            "metrics": len(metrics),
        }
        opt = dict(tree_flatten(optimizer.state))
        checkpoints.save(run_dir, c.step, params, opt, state, cfg.keep_checkpoints)

    try:
        planned = prepared.memory
        if planned and lead:
            budget.record(run_dir, planned)
        checkpointing = cfg.grad_checkpoint or bool(planned and planned.grad_checkpoint)
        with (_progress(steps, cursor.step) as advance, trainer.checkpointed(model, checkpointing),
              budget.enforced(planned.limit_gb) if planned else nullcontext(),
              distributed.watched(world, run_dir) as alive):
            cursor = trainer.run_steps(
                model, optimizer, train_data, valid_data, cfg, steps, cursor,
                on_report=lambda r: (on_report(r), advance(r)),
                on_save=on_save, on_step=lambda c: (alive(), advance(None)), on_log=log, world=world,
                splits=planned.splits if planned else 1, memory_limit_gb=planned.limit_gb if planned else 0.0,
                exact_match=scorer,
            )
        if planned and lead:
            budget.record(run_dir, planned, mx.get_peak_memory() / memory.GB)
    except RuntimeError as err:  # a collective failed: name the lost rank instead of a trace
        lost = distributed.lost_peer(err, world, run_dir)
        if lost is None:
            raise
        raise lost from None
    except trainer.Interrupted as stop:
        raise rundir.stopped(stop, run_dir) from None
    test_loss = None
    if evaluate_test and prepared.splits.get("test"):
        test = prepared.splits["test"]
        test_loss = trainer.evaluate(model, trainer.Data(test, plan(test, recipe)), cfg.max_seq_length, -1, world)
    return Success(rundir.finish(run_dir, cursor.step, metrics, trainable, test_loss, log))


@contextmanager
def _progress(total: int, done: int) -> Iterator[Callable[[trainer.StepReport | None], None]]:
    """A rich progress bar on stderr (terminals only): step, loss, tokens/s, ETA."""
    from finetune.shell.progress import bars

    progress = bars()
    task = progress.add_task("train", total=total, completed=done, status="")

    def advance(report: trainer.StepReport | None) -> None:
        if report is None:
            progress.advance(task)
        else:
            progress.update(task, status=f"loss {report.train_loss:.3f}  {report.tokens_per_second:,.0f} tok/s")

    with progress:
        yield advance


def _optimizer(recipe: Recipe, steps: int) -> optim.Optimizer:
    lr = schedule.build(recipe.train, steps, mx)
    if recipe.train.optimizer == "adam":
        return optim.Adam(learning_rate=lr)
    return optim.AdamW(learning_rate=lr, weight_decay=recipe.train.weight_decay)


def _restore(prepared: Prepared, run_dir: Path, optimizer: optim.Optimizer) -> Result[tuple[trainer.Cursor, list[dict]], str]:
    """Adapters, optimizer state and data cursor from the newest complete checkpoint.

    The random state needs no saving: the loop reseeds from (seed, step) before every step.
    """
    found = checkpoints.complete(run_dir)
    if not found:
        return Failure(f"{run_dir}: no checkpoint to resume from (checkpoints/ is empty or missing)")
    match checkpoints.load(found[-1]):
        case Success((state, params, opt)):
            pass
        case Failure(message):
            return Failure(message)
    source = found[-1]
    now = fingerprint(prepared.recipe)
    if state.get("recipe") != now:
        diff = first_difference(state.get("recipe", {}), now)
        return Failure(f"{source}: made with a different recipe ({diff}); resume with the same settings or start a new --output")
    before = state.get("total_steps")
    if before is not None and before != total_steps(prepared.recipe, len(plan(prepared.splits["train"], prepared.recipe))):
        print(f"Note: the run had {before} steps and now has a different length; the learning-rate schedule changes from here.")
    model = prepared.model
    current = trainer.flat_trainable(model)
    for name, value in params.items():
        if name not in current or current[name].shape != value.shape:
            return Failure(f"{source}/adapters.safetensors: {name} does not fit this model")
    if set(current) != set(params):
        return Failure(f"{source}/adapters.safetensors: holds {len(params)} tensors, the model needs {len(current)}")
    model.load_weights(list(params.items()), strict=False)
    optimizer.state = tree_unflatten(list(opt.items()))
    optimizer.init(model.trainable_parameters())
    mx.eval(model.parameters(), optimizer.state)
    cursor = trainer.Cursor(step=state["step"], batch_index=state["batch_index"], trained_tokens=state["trained_tokens"],
                            splits=state.get("splits", 1))
    return Success((cursor, report.metrics_until(run_dir, cursor.step)))


def _join(prepared: Prepared, world: distributed.World) -> Result[None, str]:
    """Before anything is written: every rank has the same recipe, data and model, and a row."""
    if world.size == 1:
        return Success(None)
    digest = distributed.run_digest(prepared.recipe, prepared.splits, prepared.model)
    match distributed.agree(world, "the recipe, data or model", digest):
        case Failure(message):
            return Failure(message)
    return rundir.check_world(world, prepared.recipe.train.batch_size)


def _broadcast_state(model: nn.Module, optimizer: optim.Optimizer, cursor: trainer.Cursor, world: distributed.World) -> trainer.Cursor:
    """Rank 0's restored adapters, optimizer state and cursor on every rank."""
    if world.size == 1:
        return cursor
    model.update(distributed.broadcast(model.trainable_parameters(), world))
    optimizer.state = distributed.broadcast(optimizer.state, world)
    numbers = [cursor.step, cursor.batch_index, cursor.trained_tokens] if world.rank == 0 else [0, 0, 0]
    step, batch_index, trained = (int(n) for n in distributed.sum_values(numbers))  # float64: exact
    return trainer.Cursor(step=step, batch_index=batch_index, trained_tokens=trained)


def check_output(run_dir: Path, resume: bool) -> Result[None, str]:
    """Refuse to overwrite a finished or started run unless resuming it (rank 0 decides)."""
    if distributed.setup().rank > 0:  # other hosts hold no run directory
        return Success(None)
    return rundir.check_output(run_dir, resume)
