"""`ft train start|quick --backend torch`: a recipe in, the same run directory out (adapters in
mlx-lm's format, recipe.toml, metrics.jsonl, checkpoints with the optimizer state)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
from msgspec import Struct
from returns.result import Failure, Result, Success

from finetune.core import adapters as core_adapters
from finetune.core import architectures, memplan
from finetune.core.adapters import AdapterSpec
from finetune.core.config import Recipe
from finetune.core.tokenize import Tokens
from finetune.engines import rundir
from finetune.engines.rundir import World, plan  # noqa: F401  (the engine's surface, as shell.run's)
from finetune.engines.torch import budget, distributed, packing
from finetune.engines.torch import device as devices
from finetune.engines.torch import lora as tmodel
from finetune.engines.torch import step as ttrain
from finetune.errors import UserError
from finetune.files.paths import cache_root, write_safetensors, write_text
from finetune.shell.data import check, report
from finetune.shell.evaluation import training as exact_match
from finetune.shell.models import sources
from finetune.shell.training import checkpoints, recipes

Log = Callable[[str], None]


class Prepared(Struct):
    """A transformers model with fresh LoRA, its data, and where it computes."""

    recipe: Recipe
    model: Any  # model.Lora
    tokenizer: Any
    splits: dict[str, list[Tokens]]
    spec: AdapterSpec
    kind: str  # gpt2 or llama: how mlx-lm names the adapter tensors
    device: Any  # torch.device
    dtype: Any  # torch.dtype of the base
    world: World = rundir.SINGLE  # torchrun's ranks
    memory: Any = None  # core.memplan.MemoryPlan against --memory-limit, or None
    base_gb: float = 0.0  # what the process held before the weights loaded (in the plan's estimate)


def backend_line(where: Any, dtype: Any, why: str) -> str:
    """The backend line, after joining torchrun's ranks (from here ranks above 0 print nothing)."""
    world = distributed.setup(where.type)
    line = devices.describe(where, dtype, why)
    return line if world.size == 1 else f"{line}, {rundir.describe_world(world)}"


def prepare_run(recipe: Recipe, log: Log, available_gb: float = 0.0, device: str | None = None,
                memory_limit_gb: float = 0.0) -> Result[Prepared, str]:
    """Run validate's checks, estimate (and with `memory_limit_gb` plan) the memory, then load the
    model with transformers and attach fresh peft LoRA."""
    if recipe.model.quantize_bits:
        return Failure("$.model.quantize_bits: the torch engine trains float bases only; use --backend mlx for QLoRA")
    where = devices.pick(device)
    dtype = devices.resolve_dtype(recipe.model.dtype, where)
    world = distributed.setup(where.type)
    match check.before_training(recipe, available_gb, log, engine="torch"):
        case Success(inspection):
            pass
        case Failure(message):
            return Failure(message)
    recipe = inspection.report.recipe
    splits = {k: v for k, v in inspection.tokens.items() if v}
    if recipe.train.compile:  # torch.compile's graphs and kernels kept across runs (not in /tmp): warm starts
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
    budget.reset_peak(where)  # plan.json's measured peak runs from here: the weights' loading counts
    planned, base = None, budget.process_gb(where)
    if inspection.report.facts is not None:  # before any weight loads
        match _memory(recipe, inspection.report.facts, splits["train"], dtype, base, memory_limit_gb, world, log):
            case Success(planned):
                recipe = recipe if planned is None else msgspec.structs.replace(recipe, train=msgspec.structs.replace(
                    recipe.train, grad_checkpoint=recipe.train.grad_checkpoint or planned.grad_checkpoint))
            case Failure(message):
                return Failure(message)
    log(f"Loading {recipe.model.path} ...")
    match sources.model_dir(recipe.model.path, recipe.model.revision):
        case Success(directory):
            pass
        case Failure(message):
            return Failure(message)
    loaded = tmodel.load_base(directory, dtype, recipe.model.path).bind(lambda lm: tmodel.attach(lm, recipe, recipe.model.path))
    match loaded:
        case Success(model):
            pass
        case Failure(message):
            return Failure(message)
    model.to(where)
    if recipe.train.grad_checkpoint:  # recompute each block's activations in the backward pass
        model.lm.activation_checkpointing_enable({"use_reentrant": False})
    if recipe.data.packing and not packing.supported(model, where):
        return Failure(f"$.data.packing: {model.lm.config.model_type} in transformers ignores document boundaries "
                       "in packed rows here; set packing = false or use --backend mlx")
    keys = tuple(sorted({p[len(model.prefix) + 1:].split(".", 1)[1] for p in model.paths}))
    spec = AdapterSpec(
        rank=recipe.lora.rank, scale=recipe.lora.scale, dropout=recipe.lora.dropout, keys=keys,
        num_layers=recipe.lora.num_layers, model=recipe.model.path, fine_tune_type=recipe.lora.fine_tune_type,
    )
    kind = architectures.family_of_blocks(model.prefix).family  # how mlx-lm names the tensors
    return Success(Prepared(recipe, model, inspection.tokenizer, splits, spec, kind, where, dtype, world, planned, base))


def _memory(recipe: Recipe, facts: Any, train: list[Tokens], dtype: Any, base: float, limit: float, world: World,
            log: Log) -> Result[Any, str]:
    """The estimate line, and with a limit the plan (each rank plans its share of a batch)."""
    share = msgspec.structs.replace(recipe.train, batch_size=max(1, recipe.train.batch_size // world.size))
    shared = msgspec.structs.replace(recipe, train=share)
    if not limit:
        est = budget.estimate(facts, shared, train, dtype)
        log(f"memory estimate: peak {est.total_gb + base:.3g} GB ({est.weights_gb:.3g} weights, {est.lora_gb:.3g} "
            f"adapters and Adam, {est.activations_gb:.3g} activations, {base:.3g} the process already holds); "
            "--memory-limit GB plans micro-steps under a limit")
        return Success(None)
    planned = budget.plan(shared, facts, train, limit, dtype, base)
    return planned.map(lambda p: log(memplan.describe(p)) or p)


def save_adapters(directory: Path, params: dict[str, Any], spec: AdapterSpec, kind: str) -> None:
    """`adapters.safetensors` + `adapter_config.json` in mlx-lm's format, each written atomically."""
    arrays = {k: v.numpy() for k, v in params.items()}
    write_safetensors(directory / "adapters.safetensors", core_adapters.to_file_keys(arrays, kind))
    write_text(directory / "adapter_config.json", json.dumps(core_adapters.config_json(spec), indent=2) + "\n")


def fit(prepared: Prepared, run_dir: Path, resume: bool, log: Log, evaluate_test: bool = False) -> Result[rundir.Outcome, str]:
    """Train (or continue) in `run_dir`; every file lands atomically. Rank 0 alone writes and logs."""
    recipe, model, where, world = prepared.recipe, prepared.model, prepared.device, prepared.world
    cfg = recipe.train
    match _join(prepared):
        case Failure(message):
            return Failure(message)
    lead = world.rank == 0
    log = log if lead else (lambda line: None)
    scorer = exact_match.exact_match(prepared, "torch", log) if lead else None  # before anything is written
    train_data = rundir.data(prepared.splits["train"], recipe)
    valid = prepared.splits.get("valid")
    valid_data = rundir.data(valid, recipe) if valid else None
    steps = rundir.total_steps(recipe, len(train_data.plan))
    optimizer = ttrain.Optimizer(model.trainable(), cfg, steps)
    cursor = rundir.Cursor()
    metrics: list[dict[str, Any]] = []
    if resume:  # rank 0 reads the checkpoint (other hosts have none) and hands it to every rank
        restored = _restore(prepared, run_dir, optimizer, steps) if lead else Success((cursor, metrics))
        match distributed.all_ok(world, restored):
            case Success((cursor, metrics)):
                cursor = _broadcast_state(prepared, optimizer, cursor)
                log(f"Resuming at step {cursor.step} of {steps} from {run_dir}")
            case Failure(message):
                return Failure(message)
    elif lead:
        report.start_metrics(run_dir)
    if lead:
        recipes.save(recipe, run_dir / "recipe.toml")
    trainable, total = tmodel.describe_trainable(model)
    rundir.log_start(log, trainable, total, steps, train_data, world)
    on_report = rundir.recorder(run_dir, metrics, world, log)

    def on_save(c: rundir.Cursor) -> None:
        if not lead:
            return
        params = {k: v.numpy() for k, v in model.adapters().items()}
        save_adapters(run_dir, model.adapters(), prepared.spec, prepared.kind)
        state = {**msgspec.to_builtins(c), "total_steps": steps, "recipe": rundir.fingerprint(recipe),
                 "metrics": len(metrics), "engine": "torch"}
        checkpoints.save(run_dir, c.step, params, optimizer.state(), state, cfg.keep_checkpoints)

    planned = prepared.memory
    if planned and lead:
        budget.record(run_dir, planned, prepared.base_gb)
    with _one_line_errors(world, run_dir):
        cursor = ttrain.run_steps(model, optimizer, train_data, valid_data, cfg, steps, cursor, where,
                                  on_report=on_report, on_save=on_save, on_log=log, world=world,
                                  splits=planned.splits if planned else 1, memory_limit_gb=planned.limit_gb if planned else 0.0,
                                  exact_match=scorer)
        if planned and lead:
            budget.record(run_dir, planned, prepared.base_gb, budget.peak_gb(where))
        test_loss = None
        if evaluate_test and prepared.splits.get("test"):
            test = rundir.data(prepared.splits["test"], recipe)
            test_loss = ttrain.evaluate(model, test, cfg.max_seq_length, -1, where, world)
    return Success(rundir.finish(run_dir, cursor.step, metrics, trainable, test_loss, log))


@contextmanager
def _one_line_errors(world: World, run_dir: Path) -> Iterator[None]:
    """Ctrl-C, torchrun's SIGTERM and a lost peer end the run with one line, not a trace."""
    try:
        yield
    except rundir.Interrupted as stop:
        raise rundir.stopped(stop, run_dir) from None
    except distributed.Terminated as err:
        raise UserError(f"{err}; the last checkpoint in {run_dir} is intact: continue with --resume") from None
    except RuntimeError as err:  # a collective failed: name the lost rank
        lost = distributed.lost_peer(err, world, run_dir)
        if lost is None:
            raise
        raise lost from None


def _restore(prepared: Prepared, run_dir: Path, optimizer: ttrain.Optimizer, steps: int) -> Result[tuple[rundir.Cursor, list[dict]], str]:
    """Adapters, optimizer state and data cursor from the newest complete checkpoint."""
    from safetensors.numpy import load_file

    found = checkpoints.complete(run_dir)
    if not found:
        return Failure(f"{run_dir}: no checkpoint to resume from (checkpoints/ is empty or missing)")
    match checkpoints.load(found[-1], load_file):
        case Success((state, params, opt)):
            pass
        case Failure(message):
            return Failure(message)
    source = found[-1]
    now = rundir.fingerprint(prepared.recipe)
    if state.get("recipe") != now:
        diff = rundir.first_difference(state.get("recipe", {}), now)
        return Failure(f"{source}: made with a different recipe ({diff}); resume with the same settings or start a new --output")
    if state.get("total_steps") not in (None, steps):
        print(f"Note: the run had {state['total_steps']} steps and now has a different length; the learning-rate schedule changes from here.")
    live = prepared.model.trainable()
    for name, value in params.items():
        if name not in live or tuple(live[name].shape) != value.shape[::-1]:
            return Failure(f"{source}/adapters.safetensors: {name} does not fit this model")
    if set(live) != set(params):
        return Failure(f"{source}/adapters.safetensors: holds {len(params)} tensors, the model needs {len(live)}")
    prepared.model.load_adapters(params)
    optimizer.restore(opt)
    cursor = rundir.Cursor(step=state["step"], batch_index=state["batch_index"], trained_tokens=state["trained_tokens"],
                           splits=state.get("splits", 1))
    return Success((cursor, report.metrics_until(run_dir, cursor.step)))


def check_output(run_dir: Path, resume: bool) -> Result[None, str]:
    """Refuse to overwrite a finished or started run unless resuming it (rank 0 decides; every
    rank stops with it, so none is left waiting in a collective)."""
    world = distributed.current()  # joined by prepare_run
    mine = rundir.check_output(run_dir, resume) if world.rank == 0 else Success(None)
    return distributed.all_ok(world, mine)


def _join(prepared: Prepared) -> Result[None, str]:
    """Before anything is written: every rank has the same recipe, data and model, and a row."""
    world = prepared.world
    if world.size == 1:
        return Success(None)
    shapes = [f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in prepared.model.named_parameters()]
    digest = rundir.run_digest(prepared.recipe, prepared.splits, shapes)
    return distributed.agree(world, "the recipe, data or model", digest).bind(
        lambda _: rundir.check_world(world, prepared.recipe.train.batch_size))


def _broadcast_state(prepared: Prepared, optimizer: ttrain.Optimizer, cursor: rundir.Cursor) -> rundir.Cursor:
    """Rank 0's restored adapters, optimizer state and cursor on every rank."""
    world = prepared.world
    if world.size == 1:
        return cursor
    tensors = {f"param/{k}": p for k, p in optimizer.params.items()}
    tensors |= {f"m/{k}": t for k, t in optimizer.m.items()} | {f"v/{k}": t for k, t in optimizer.v.items()}
    distributed.broadcast_(world, tensors)
    numbers = [cursor.step, cursor.batch_index, cursor.trained_tokens, optimizer.step]
    step, batch_index, trained, opt_step = (int(n) for n in distributed.sum_values(
        world, numbers if world.rank == 0 else [0, 0, 0, 0]))  # float64: exact
    optimizer.step = opt_step
    return rundir.Cursor(step=step, batch_index=batch_index, trained_tokens=trained)
