"""The one shape of an engine: what the engine-free shell (the training loop, evaluation,
generation, serving) asks of MLX and torch alike, and the plain values they trade.

An `Engine` loads models and prepares a run; a `Trainer` is a prepared run's model and optimizer
state, driven step by step by the shell's loop (`shell/training/loop.py`). Engines are found by
name (`finetune.engines.get`). Nothing here imports MLX or torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import msgspec
import numpy as np
from msgspec import Struct
from returns.result import Result

from finetune.core import batching, memplan
from finetune.core.adapters import AdapterSpec
from finetune.core.config import Recipe
from finetune.core.evaluation import Done
from finetune.core.modelinfo import ModelFacts
from finetune.core.tokenize import Tokens


class World(Struct, frozen=True):
    """This process among data-parallel ranks, as its engine's launcher started it."""

    rank: int
    size: int
    backend: str  # "gloo", "nccl", "ring", ...; "none" for one process


SINGLE = World(0, 1, "none")


def describe_world(world: World) -> str:
    return "one process" if world.size == 1 else f"{world.size} ranks over {world.backend}"


class Data(Struct, frozen=True):
    examples: list[Tokens]
    plan: list[list[list[int]]]  # batches -> rows -> example indices


def plan(examples: list[Tokens], recipe: Recipe) -> list[list[list[int]]]:
    lengths = [len(t.ids) for t in examples]
    if recipe.data.packing:
        return batching.packed(lengths, recipe.train.batch_size, recipe.train.max_seq_length)
    return batching.length_sorted(lengths, recipe.train.batch_size)


def data(examples: list[Tokens], recipe: Recipe) -> Data:
    return Data(examples, plan(examples, recipe))


def batch_share(data: Data, index: int, max_length: int, rank: int = 0, ranks: int = 1,
                part: int = 0, parts: int = 1) -> batching.Batch:
    """Micro-step `part` of `parts` of rank `rank`'s share of the plan's batch `index`.

    Ranks split the batch first, then each splits its own share. An empty share (more ranks or
    parts than rows) is the batch's first row with every weight 0: it adds nothing to the sums
    yet runs the same step, so its rank still joins the collectives.
    """
    share = batching.shares(batching.shares(data.plan[index], ranks)[rank], parts)[part]
    rows = [[data.examples[i] for i in row] for row in share or data.plan[index][:1]]
    b = batching.make_batch(rows, max_length)
    if not share:
        b = msgspec.structs.replace(b, weights=np.zeros_like(b.weights), tokens=0, supervised=0)
    return b


class Prepared(Struct):
    """A model with fresh LoRA, its data, and the settings to train it (either engine)."""

    engine: str  # the registry name of the engine that prepared it
    recipe: Recipe  # resolved: what recipe.toml records
    model: Any  # the engine's trainable model
    tokenizer: Any
    splits: dict[str, list[Tokens]]
    spec: AdapterSpec
    kind: str  # how mlx-lm names the adapter tensors (gpt2, llama, ...)
    memory: memplan.MemoryPlan | None = None  # micro-steps and checkpointing against the limit
    world: World = SINGLE
    device: Any = None  # torch: torch.device; MLX: None (MLX's default device)
    dtype: Any = None  # torch: the base's dtype
    base_gb: float = 0.0  # torch: what the process held before the weights loaded


class Step(NamedTuple):
    """One optimizer step, as the loop sees it: no loss here (see `Trainer.loss`)."""

    tokens: float  # supervised tokens of the whole step, summed over ranks
    stopping: bool  # some rank asked to stop (Ctrl-C), known to every rank alike


class Trainer(Protocol):
    """A prepared run's model and optimizer state: what the one loop drives."""

    world: World

    def seed(self, n: int) -> None:
        """Seed dropout's randomness for the next step."""

    def step(self, batches: Sequence[batching.Batch], stop: bool) -> Step:
        """One optimizer step over this rank's micro-batches (gradients accumulated, summed over
        ranks, divided by the step's tokens, clipped, applied). `stop`: this rank's Ctrl-C."""

    def loss(self) -> float:
        """Σ loss of this rank's micro-batches since the last call (the loop calls it only at
        report steps: the engine may keep the sum on its device until then)."""

    def evaluate(self, data: Data, max_length: int, num_batches: int) -> float:
        """Token-weighted mean loss over the first `num_batches` batches (-1: all), over ranks."""

    def learning_rate(self, step: int) -> float:
        """The learning rate optimizer step `step` (1-based) used."""

    def peak_gb(self) -> float:
        """Peak memory since the last `reset_peak`, GB."""

    def reset_peak(self) -> None: ...

    def sum_values(self, values: list[float]) -> list[float]:
        """`values` summed over ranks (float64)."""

    def tensors(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(adapter parameters, optimizer state) by name, as a checkpoint stores them."""

    def restore(self, params: Mapping[str, Any], opt: Mapping[str, Any], source: Path) -> Result[None, str]:
        """Load a checkpoint's tensors (read by `Engine.read_tensors`), or say why they do not fit."""

    def broadcast(self) -> None:
        """Rank 0's adapters and optimizer state on every rank."""

    def running(self, run_dir: Path) -> AbstractContextManager[Callable[[], None]]:
        """The training's context (memory limit, activation checkpointing, a watchdog over the
        ranks; failures of the ranks as one line); yields the function to call after each step."""


class Engine(Protocol):
    """One training and inference engine; `finetune.engines.get(name)` returns it."""

    name: str

    # where it computes
    def device_line(self, device: str | None, dtype: str, why: str) -> tuple[str, float]:
        """(the backend line, GB of memory of the device) for `--device` and the recipe's dtype;
        for ranks, the line once they joined."""

    def train_dtype(self, dtype: str, device: str | None) -> str:
        """The dtype name the engine trains a base in for the recipe's `dtype` on `device`."""

    def uses_gpu(self) -> bool:
        """The engine computes on a GPU here (by default)."""

    def facts(self, directory: Path, spec: str, config: Mapping[str, Any]) -> Result[ModelFacts, str]:
        """What memory estimates need of MODEL (its config.json; the torch engine builds what it has
        no architecture row for on the meta device)."""

    def device_kind(self, device: str | None) -> str:
        """Where `--device` computes: "cpu", "gpu" (MLX), "cuda" or "mps" (torch)."""

    def load_base(self, directory: Path, dtype: str, spec: str) -> Result[Any, str]:
        """The base model of a local directory in `dtype` (no tokenizer, no adapters)."""

    def join(self, recipe: Recipe, device: str | None) -> Result[World, str]:
        """Refuse a recipe this engine cannot train, then join its launcher's ranks (one process
        when not launched; ranks above 0 print nothing from here)."""

    def world(self) -> World:
        """The ranks joined (one process before `join`)."""

    def sum_values(self, world: World, values: list[float]) -> list[float]:
        """`values` summed over ranks (float64)."""

    # models, for generation, evaluation and serving
    def load(self, spec: str, *, adapter: str | None = None, revision: str = "main", device: str | None = None,
             why: str = "", say: Callable[[str], None] = lambda line: None,
             verbose: bool = False) -> Result[tuple[Any, Any], str]:
        """(model, tokenizer) of MODEL (with `adapter` attached), checked as every loader checks it, in
        eval mode; the backend line goes to `say` (MLX: before loading; torch: after, naming the dtype)."""

    def generate(self, model: Any, ids: Sequence[int], **sampling: Any) -> Iterator[int]:
        """Token ids after `ids`, one at a time (the KV cache; sampling as `ft generate`'s)."""

    def greedy(self, model: Any, prompts: Sequence[Sequence[int]], max_tokens: int, stop_ids: Sequence[int],
               done: Done, pad_id: int = 0) -> list[list[int]]:
        """Greedy answers after each prompt, decoded together (left-padded, own positions)."""

    def bare(self, model: Any) -> Any:
        """`model` with every adapter layer replaced by the base layer it wraps (in place)."""

    def attach(self, model: Any, adapter: str) -> Result[Any, str]:
        """An adapter directory of any format on `model` (in place), checked, in eval mode."""

    def adapter_layers(self, model: Any) -> dict[str, Any]:
        """The model's adapter layers by module path."""

    def put_layers(self, model: Any, layers: Mapping[str, Any]) -> None:
        """Put each layer at its module path in the model."""

    def release(self) -> None:
        """What a thread that generated must release before it ends."""

    def needs_own_base(self, adapter: str) -> bool:
        """The adapter was trained on a base this engine must load for it alone (quantized)."""

    def load_with(self, spec: str, adapter: str) -> Result[Any, str]:
        """The base rebuilt as the adapter records it, with the adapter attached."""

    def loss(self, model: Any, tokens: list[Tokens], recipe: Recipe) -> float:
        """The trainer's token-weighted loss on these rows (teacher-forced)."""

    def check_logits(self, config: Mapping[str, Any], rows: Sequence[Sequence[int]], base: Mapping[str, Any],
                     plan: Mapping[str, Any], pairs: Mapping[str, Any], scale: float, variants: Any,
                     variant_plan: Mapping[str, Any]) -> tuple[list[Any], list[Any], list[list[Any]]]:
        """`ft fuse`'s check: float32 logits of the base, the base with the unfused LoRA `pairs`,
        and each variant (`shell/export/fuse_check.py` says what each argument is)."""

    # training
    def prepare(self, recipe: Recipe, facts: ModelFacts | None, splits: dict[str, list[Tokens]], tokenizer: Any,
                options: PrepareOptions, log: Callable[[str], None]) -> Result[Prepared, str]:
        """Plan the memory (before any weight loads), load the base, attach fresh adapters."""

    def trainer(self, prepared: Prepared, total_steps: int) -> Trainer:
        """The run's optimizer and step around the prepared model."""

    def read_tensors(self, path: str) -> dict[str, Any]:
        """A checkpoint's safetensors file as this engine's arrays."""

    def count(self, prepared: Prepared) -> tuple[int, int]:
        """(trainable parameters, every parameter) of the prepared model."""

    def shapes(self, prepared: Prepared) -> list[str]:
        """One line per parameter (name, shape, dtype): what every rank must share."""

    def record_plan(self, prepared: Prepared, run_dir: Path, measured_gb: float | None = None) -> None:
        """plan.json in the run directory: the memory plan and (at the end) the measured peak."""

    def sampler(self, prepared: Prepared) -> tuple[Any, Callable[[], AbstractContextManager]]:
        """(what generates, a context of the precision it trains in) for `generate`/`greedy` on the
        model being trained: samples and `--eval-generate`."""


class PrepareOptions(Struct, frozen=True, kw_only=True):
    """What `prepare` takes besides the recipe and its data."""

    device: str | None = None
    available_gb: float = 0.0
    memory_limit_gb: float = 0.0
