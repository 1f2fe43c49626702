"""The MLX engine behind the one protocol (`engines/protocol.py`): our own modules, mlx-lm's
adapter format, one compiled function per step. MLX is imported where it is used."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import msgspec
from returns.result import Failure, Result, Success

from finetune.core import architectures, lora, memplan
from finetune.core.adapters import AdapterSpec
from finetune.core.config import Recipe
from finetune.core.modelinfo import ModelFacts
from finetune.core.tokenize import Tokens
from finetune.engines.protocol import Prepared, PrepareOptions, World

Log = Callable[[str], None]


class MlxEngine:
    name = "mlx"

    # where it computes
    def device_line(self, device: str | None, dtype: str, why: str) -> tuple[str, float]:
        from finetune.engines.mlx import device as backend

        info = backend.select(device)
        return backend.describe(info, why), info.memory_gb

    def train_dtype(self, dtype: str, device: str | None) -> str:
        return dtype  # the MLX loader resolves "auto" per checkpoint and device

    def uses_gpu(self) -> bool:
        from finetune.engines.mlx.load import on_gpu

        return on_gpu()

    def facts(self, directory: Path, spec: str, config: Mapping[str, Any]) -> Result[ModelFacts, str]:
        from finetune.core import modelinfo

        return modelinfo.facts(config)

    def device_kind(self, device: str | None) -> str:
        from finetune.engines.mlx import device as backend

        return "gpu" if backend.select(device).device == "gpu" else "cpu"

    def load_base(self, directory: Path, dtype: str, spec: str) -> Result[Any, str]:
        from finetune.engines.mlx.load import load_model

        return load_model(str(directory), dtype=dtype).map(lambda pair: pair[0])

    def join(self, recipe: Recipe, device: str | None) -> Result[World, str]:
        return Success(self.world())

    def world(self) -> World:
        from finetune.engines.mlx import distributed

        return distributed.setup()

    def sum_values(self, world: World, values: list[float]) -> list[float]:
        from finetune.engines.mlx import distributed

        return distributed.sum_values(values) if world.size > 1 else list(values)

    # models
    def load(self, spec: str, *, adapter: str | None = None, revision: str = "main", device: str | None = None,
             why: str = "", say: Log = lambda line: None, verbose: bool = False) -> Result[tuple[Any, Any], str]:
        from finetune.engines.mlx import device as backend
        from finetune.engines.mlx.load import load_model

        info = backend.select(device)  # before loading: dtype="auto" depends on the device
        say(backend.describe(info, why))
        if verbose and info.blas_path:
            say(f"BLAS library: {info.blas_path}")
        return load_model(spec, revision=revision, adapter=adapter)

    def generate(self, model: Any, ids: Sequence[int], **sampling: Any) -> Iterator[int]:
        from finetune.engines.mlx.generate import generate

        return generate(model, ids, **sampling)

    def greedy(self, *args: Any, **kwargs: Any) -> list[list[int]]:  # the protocol's signature
        from finetune.engines.mlx.evaluate import greedy

        return greedy(*args, **kwargs)

    def bare(self, model: Any) -> Any:
        from finetune.engines.mlx.lora import bare

        return bare(model)

    def attach(self, model: Any, adapter: str) -> Result[Any, str]:
        from finetune.engines.mlx.lora import attach_checked

        return attach_checked(model, adapter).map(lambda m: m.eval())

    def adapter_layers(self, model: Any) -> dict[str, Any]:
        from finetune.engines.mlx.lora import adapter_layers

        return adapter_layers(model)

    def put_layers(self, model: Any, layers: Mapping[str, Any]) -> None:
        from mlx.utils import tree_unflatten

        if layers:
            model.update_modules(tree_unflatten(list(layers.items())))

    def release(self) -> None:
        import mlx.core as mx

        # MLX gives each thread its own streams; a thread ending with them alive can abort the
        # process at exit ("terminate called without an active exception", 1 run in 4 here).
        mx.synchronize()
        mx.clear_streams()

    def needs_own_base(self, adapter: str) -> bool:
        from finetune.engines.mlx.load import recorded

        return recorded(adapter).value_or(None) is not None

    def load_with(self, spec: str, adapter: str) -> Result[Any, str]:
        from finetune.engines.mlx.load import load_model

        return load_model(spec, adapter=adapter).map(lambda pair: pair[0])

    def loss(self, model: Any, tokens: list[Tokens], recipe: Recipe) -> float:
        from finetune.engines.mlx import step
        from finetune.engines.protocol import data

        value = step.evaluate(model, data(tokens, recipe), recipe.train.max_seq_length, -1)
        model.eval()  # evaluate leaves the model in training mode (dropout on)
        return value

    def sampler(self, prepared: Prepared) -> tuple[Any, Callable[[], AbstractContextManager]]:
        return prepared.model, nullcontext

    def check_logits(self, *args: Any) -> tuple[list[Any], list[Any], list[list[Any]]]:  # the protocol's signature
        from finetune.engines.mlx.check import logits

        return logits(*args)

    # training
    def prepare(self, recipe: Recipe, facts: ModelFacts | None, splits: dict[str, list[Tokens]], tokenizer: Any,
                options: PrepareOptions, log: Log) -> Result[Prepared, str]:
        """Plan the memory before any weight loads, load the model (quantized on load for QLoRA)
        and attach fresh LoRA (or DoRA), or unfreeze the last blocks (full)."""
        import mlx.core as mx

        from finetune.core import full, quantization
        from finetune.engines.mlx import budget
        from finetune.engines.mlx import lora as lora_modules
        from finetune.engines.mlx.load import load_model
        from finetune.engines.mlx.quantized import describe as describe_quantization

        if isinstance(refused := full.check_recipe(recipe), Failure):
            return refused
        world = self.world()
        planned = None
        if facts is not None:  # plan memory before any weight loads
            limit = options.memory_limit_gb or budget.device_budget_gb()
            share = msgspec.structs.replace(recipe.train, batch_size=-(-recipe.train.batch_size // world.size))
            match budget.plan(msgspec.structs.replace(recipe, train=share), facts, splits["train"], limit):
                case Success(planned):
                    line = memplan.describe(planned)
                    log(line if world.size == 1 else line.replace("memory plan:", f"memory plan, each of {world.size} ranks:", 1))
                case Failure(message):
                    return Failure(message)
        log(f"Loading {recipe.model.path} ...")
        on_load = quantization.on_load(recipe.model.quantize_bits, recipe.model.quantize_group_size)
        match load_model(recipe.model.path, revision=recipe.model.revision, dtype=recipe.model.dtype, quantize=on_load):
            case Success((model, tok)):
                pass
            case Failure(message):
                return Failure(message)
        base = describe_quantization(model)
        if base and recipe.lora.fine_tune_type == "full":
            return Failure(f"{recipe.model.path}: a quantized checkpoint ({base.summary()}) cannot be trained in full; "
                           "use its float original, or --fine-tune-type lora (QLoRA)")
        if base:  # QLoRA: the base stays quantized, LoRA trains in float32
            log(f"Base quantized {'on load' if on_load else 'as stored'}: {base.summary()} (QLoRA)")
        if recipe.lora.fine_tune_type == "full":
            return self._full(recipe, model, tok, splits, planned, world)
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
        return Success(Prepared(engine=self.name, recipe=recipe, model=model, tokenizer=tok, splits=splits, spec=spec,
                                kind=architectures.family_of_blocks(lora_modules.layers_prefix(model)).family,
                                memory=planned, world=world))

    def _full(self, recipe: Recipe, model: Any, tok: Any, splits: dict[str, list[Tokens]],
              planned: memplan.MemoryPlan | None, world: World) -> Result[Prepared, str]:
        """mlx-lm's full fine-tune: the last `num_layers` blocks' every weight trains, nothing attached."""
        from finetune.engines.mlx import full
        from finetune.engines.mlx import lora as lora_modules

        if recipe.lora.num_layers > len(model.layers):
            return Failure(f"$.lora.num_layers: {recipe.lora.num_layers} exceeds the model's {len(model.layers)} layers")
        full.unfreeze(model, recipe.lora.num_layers)
        spec = AdapterSpec(rank=recipe.lora.rank, scale=recipe.lora.scale, dropout=0.0, keys=(),
                           num_layers=recipe.lora.num_layers, model=recipe.model.path, fine_tune_type="full")
        return Success(Prepared(engine=self.name, recipe=recipe, model=model, tokenizer=tok, splits=splits, spec=spec,
                                kind=architectures.family_of_blocks(lora_modules.layers_prefix(model)).family,
                                memory=planned, world=world))

    def trainer(self, prepared: Prepared, total_steps: int) -> Any:
        import mlx.core as mx
        import mlx.optimizers as optim

        from finetune.core import schedule
        from finetune.engines.mlx.step import Trainer

        recipe = prepared.recipe
        lr = schedule.build(recipe.train, total_steps, mx)
        if recipe.train.optimizer == "adam":
            optimizer = optim.Adam(learning_rate=lr)
        else:
            optimizer = optim.AdamW(learning_rate=lr, weight_decay=recipe.train.weight_decay)
        optimizer.init(prepared.model.trainable_parameters())
        mx.random.seed(recipe.train.seed)
        return Trainer(prepared.model, optimizer, recipe.train, prepared.world, prepared.memory)

    def read_tensors(self, path: str) -> dict[str, Any]:
        import mlx.core as mx

        return dict(mx.load(path))

    def count(self, prepared: Prepared) -> tuple[int, int]:
        from mlx.utils import tree_flatten

        from finetune.engines.mlx.quantized import unpacked_parameters

        trainable = sum(v.size for _, v in tree_flatten(prepared.model.trainable_parameters()))
        return trainable, unpacked_parameters(prepared.model)  # a QLoRA base counts its weights, not its packed words

    def shapes(self, prepared: Prepared) -> list[str]:
        from mlx.utils import tree_flatten

        return [f"{n}:{v.shape}:{v.dtype}" for n, v in tree_flatten(prepared.model.parameters())]

    def record_plan(self, prepared: Prepared, run_dir: Path, measured_gb: float | None = None) -> None:
        from finetune.engines.mlx import budget

        budget.record(run_dir, prepared.memory, measured_gb)


def _digest(model: Any) -> str:
    """The quantized base's identity, recorded in the adapter (`quantization.codes_digest`)."""
    from finetune.core.quantization import codes_digest
    from finetune.engines.mlx.quantized import codes

    return codes_digest(codes(model))


ENGINE = MlxEngine()
