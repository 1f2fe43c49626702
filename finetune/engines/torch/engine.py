"""The torch engine behind the one protocol (`engines/protocol.py`): transformers' causal LMs with
peft LoRA, the MLX engine's loss, optimizer and schedule. torch is imported where it is used."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
from returns.result import Failure, Result, Success

from finetune.core import architectures, memplan
from finetune.core.adapters import AdapterSpec
from finetune.core.config import Recipe
from finetune.core.modelinfo import ModelFacts
from finetune.core.tokenize import Tokens
from finetune.engines.protocol import Prepared, PrepareOptions, World, describe_world

Log = Callable[[str], None]


class TorchEngine:
    name = "torch"

    # where it computes
    def device_line(self, device: str | None, dtype: str, why: str) -> tuple[str, float]:
        """The backend line, after joining torchrun's ranks (from here ranks above 0 print nothing)."""
        from finetune.engines.torch import device as devices
        from finetune.engines.torch import distributed

        where = devices.pick(device)
        world = distributed.setup(where.type)
        line = devices.describe(where, devices.resolve_dtype(dtype, where), why)
        return (line if world.size == 1 else f"{line}, {describe_world(world)}"), devices.memory_gb(where)

    def train_dtype(self, dtype: str, device: str | None) -> str:
        from finetune.engines.torch import device as devices

        return str(devices.resolve_dtype(dtype, devices.pick(device))).removeprefix("torch.")

    def uses_gpu(self) -> bool:
        from finetune.engines.torch import device as devices

        return devices.pick(None).type != "cpu"

    def facts(self, directory: Path, spec: str, config: Mapping[str, Any]) -> Result[ModelFacts, str]:
        from finetune.core import modelinfo
        from finetune.engines.torch.facts import skeleton_facts

        if config.get("model_type") in architectures.REGISTRY:
            return modelinfo.facts(config)
        return skeleton_facts(directory, spec)

    def device_kind(self, device: str | None) -> str:
        from finetune.engines.torch import device as devices

        return devices.pick(device).type

    def load_base(self, directory: Path, dtype: str, spec: str) -> Result[Any, str]:
        from finetune.engines.torch.device import DTYPES
        from finetune.engines.torch.load import load_base

        return load_base(directory, DTYPES[dtype], spec)

    def join(self, recipe: Recipe, device: str | None) -> Result[World, str]:
        from finetune.engines.torch import device as devices
        from finetune.engines.torch import distributed

        if recipe.model.quantize_bits:
            return Failure("$.model.quantize_bits: the torch engine trains float bases only; use --backend mlx for QLoRA")
        return Success(distributed.setup(devices.pick(device).type))

    def world(self) -> World:
        from finetune.engines.torch import distributed

        return distributed.current()  # joined by `join`

    def sum_values(self, world: World, values: list[float]) -> list[float]:
        from finetune.engines.torch import distributed

        return distributed.sum_values(world, values)

    # models
    def load(self, spec: str, *, adapter: str | None = None, revision: str = "main", device: str | None = None,
             why: str = "", say: Log = lambda line: None, verbose: bool = False) -> Result[tuple[Any, Any], str]:
        """The backend line is said after loading (it names the dtype loaded), on success only."""
        from finetune.engines.torch import device as devices
        from finetune.engines.torch.load import load

        where = devices.pick(device)
        loaded = load(spec, adapter, where, revision)
        if isinstance(loaded, Success):
            say(devices.describe(where, next(loaded.unwrap()[0].parameters()).dtype, why))
        return loaded

    def generate(self, model: Any, ids: Sequence[int], **sampling: Any) -> Iterator[int]:
        from finetune.engines.torch.generate import generate

        return generate(model, ids, **sampling)

    def greedy(self, *args: Any, **kwargs: Any) -> list[list[int]]:  # the protocol's signature
        from finetune.engines.torch.evaluate import greedy

        return greedy(*args, **kwargs)

    def bare(self, model: Any) -> Any:
        self.put_layers(model, {path: m.get_base_layer() for path, m in self.adapter_layers(model).items()})
        model.__dict__.pop("peft_config", None)  # as peft's own unload: the model is bare again
        return model

    def attach(self, model: Any, adapter: str) -> Result[Any, str]:
        from finetune.engines.torch.lora import with_adapter

        device = next(model.parameters()).device
        return with_adapter(model, adapter).map(lambda m: m.to(device).eval())

    def adapter_layers(self, model: Any) -> dict[str, Any]:
        from peft.tuners.tuners_utils import BaseTunerLayer

        return {p: m for p, m in model.named_modules() if isinstance(m, BaseTunerLayer)}

    def put_layers(self, model: Any, layers: Mapping[str, Any]) -> None:
        for path, module in layers.items():
            parent, _, leaf = path.rpartition(".")
            setattr(model.get_submodule(parent), leaf, module)

    def release(self) -> None:
        """Nothing to release: torch's threads need no goodbye."""

    def needs_own_base(self, adapter: str) -> bool:
        return False  # a quantized base is refused when attached: the torch engine loads float bases only

    def load_with(self, spec: str, adapter: str) -> Result[Any, str]:
        """A full fine-tune's base with its trained weights; a quantized base's adapter is refused."""
        from finetune.files.adapters import is_full

        if is_full(adapter):
            from finetune.engines.torch import device as devices
            from finetune.engines.torch.load import load

            return load(spec, adapter, devices.pick(None)).map(lambda pair: pair[0])
        return Failure(f"{adapter}: trained on a quantized base; the torch engine loads float checkpoints only")

    def loss(self, model: Any, tokens: list[Tokens], recipe: Recipe) -> float:
        from finetune.engines.protocol import data
        from finetune.engines.torch import step
        from finetune.engines.torch.evaluate import Scorer

        device = next(model.parameters()).device
        value = step.evaluate(Scorer(model), data(tokens, recipe), recipe.train.max_seq_length, -1, device)
        model.eval()  # evaluate leaves the model in training mode (dropout on)
        return value

    def sampler(self, prepared: Prepared) -> tuple[Any, Callable[[], AbstractContextManager]]:
        """transformers' model with the peft layers in place, under the training's autocast (a
        half-precision base keeps float32 LoRA factors)."""
        import torch

        half = prepared.model.half_precision()
        return prepared.model.lm, partial(torch.autocast, prepared.device.type, dtype=half, enabled=half is not None)

    def check_logits(self, *args: Any) -> tuple[list[Any], list[Any], list[list[Any]]]:  # the protocol's signature
        from finetune.engines.torch.check import logits

        return logits(*args)

    # training
    def prepare(self, recipe: Recipe, facts: ModelFacts | None, splits: dict[str, list[Tokens]], tokenizer: Any,
                options: PrepareOptions, log: Log) -> Result[Prepared, str]:
        """Estimate (and with a memory limit plan) the memory, then load the model with
        transformers and attach fresh peft LoRA (full: unfreeze the last blocks, no peft)."""
        from finetune.core import full
        from finetune.engines.torch import budget, distributed, packing
        from finetune.engines.torch import device as devices
        from finetune.engines.torch import lora as tlora
        from finetune.engines.torch.load import load_base
        from finetune.files import sources
        from finetune.files.paths import cache_root

        if isinstance(refused := full.check_recipe(recipe), Failure):
            return refused
        where = devices.pick(options.device)
        dtype = devices.resolve_dtype(recipe.model.dtype, where)
        world = distributed.setup(where.type)
        if recipe.train.compile:  # torch.compile's graphs and kernels kept across runs (not in /tmp): warm starts
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
        budget.reset_peak(where)  # plan.json's measured peak runs from here: the weights' loading counts
        planned, base = None, budget.process_gb(where)
        if facts is not None:  # before any weight loads
            match _memory(recipe, facts, splits["train"], dtype, base, options.memory_limit_gb, world, log):
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
        if recipe.lora.fine_tune_type == "full":  # the last blocks' weights train: no peft
            from finetune.engines.torch import full as tfull

            attach = tfull.attach
        else:
            attach = tlora.attach
        loaded = load_base(directory, dtype, recipe.model.path).bind(lambda lm: attach(lm, recipe, recipe.model.path))
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
            rank=recipe.lora.rank, scale=recipe.lora.scale, dropout=recipe.lora.dropout, keys=keys,  # full: ()
            num_layers=recipe.lora.num_layers, model=recipe.model.path, fine_tune_type=recipe.lora.fine_tune_type,
        )
        kind = architectures.family_of_blocks(model.prefix).family  # how mlx-lm names the tensors
        return Success(Prepared(engine=self.name, recipe=recipe, model=model, tokenizer=tokenizer, splits=splits,
                                spec=spec, kind=kind, memory=planned, world=world, device=where, dtype=dtype, base_gb=base))

    def trainer(self, prepared: Prepared, total_steps: int) -> Any:
        from finetune.engines.torch.optim import Optimizer
        from finetune.engines.torch.step import Trainer

        cfg = prepared.recipe.train
        optimizer = Optimizer(prepared.model.trainable(), cfg, total_steps, prepared.model.transposed())
        return Trainer(prepared.model, optimizer, cfg, prepared.device, prepared.world)

    def read_tensors(self, path: str) -> dict[str, Any]:
        from safetensors.numpy import load_file

        return load_file(path)

    def count(self, prepared: Prepared) -> tuple[int, int]:
        from finetune.engines.torch.lora import describe_trainable

        return describe_trainable(prepared.model)

    def shapes(self, prepared: Prepared) -> list[str]:
        return [f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in prepared.model.named_parameters()]

    def record_plan(self, prepared: Prepared, run_dir: Path, measured_gb: float | None = None) -> None:
        from finetune.engines.torch import budget

        budget.record(run_dir, prepared.memory, prepared.base_gb, measured_gb)


def _memory(recipe: Recipe, facts: ModelFacts, train: list[Tokens], dtype: Any, base: float, limit: float,
            world: World, log: Log) -> Result[memplan.MemoryPlan | None, str]:
    """The estimate line, and with a limit the plan (each rank plans its share of a batch)."""
    from finetune.engines.torch import budget

    share = msgspec.structs.replace(recipe.train, batch_size=max(1, recipe.train.batch_size // world.size))
    shared = msgspec.structs.replace(recipe, train=share)
    if not limit:
        est = budget.estimate(facts, shared, train, dtype)
        state = "trained weights' gradients and Adam" if est.fine_tune_type == "full" else "adapters and Adam"
        log(f"memory estimate: peak {est.total_gb + base:.3g} GB ({est.weights_gb:.3g} weights, {est.lora_gb:.3g} "
            f"{state}, {est.activations_gb:.3g} activations, {base:.3g} the process already holds); "
            "--memory-limit GB plans micro-steps under a limit")
        return Success(None)
    planned = budget.plan(shared, facts, train, limit, dtype, base)
    return planned.map(lambda p: log(memplan.describe(p)) or p)


ENGINE = TorchEngine()
