"""A base model of either engine with LoRA adapters swapped in per request, never reloaded.

An adapter is attached by the engine's own loader (its checks, its refusals), its LoRA layers are
kept, and the base's layers are put back; a request runs with one adapter's layers swapped in.
The layers wrap the base's own linears, so nothing is copied and the base is shared by all.
Only the worker thread calls these (the swap mutates the model).
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from returns.result import Result, Success

from finetune.shell.models import sources

Swap = Mapping[str, Any]  # module path -> that adapter's LoRA layer


class Engine(ABC):
    """What the server needs of a loaded model; `MlxEngine` and `TorchEngine` fill it in."""

    name = ""
    tokenizer: Any = None
    context = 0  # most positions the model takes (0: not known)

    @abstractmethod
    def load(self, spec: str, device: str | None, why: str) -> Result[None, str]:
        """Load MODEL (on the calling thread: the worker), printing the backend line."""

    @abstractmethod
    def tokens(self, ids: list[int], **sampling: Any) -> Iterator[int]:
        """The engine's own `generate`: token ids after `ids`, one at a time."""

    @abstractmethod
    def prepare(self, directory: str) -> Result[Swap, str]:
        """The adapter's LoRA layers, checked against the base; the base is left bare."""

    @abstractmethod
    def _set(self, modules: Mapping[str, Any]) -> None:
        """Put each module at its path in the model."""

    @abstractmethod
    def _lora_layers(self) -> dict[str, Any]:
        """The model's LoRA layers by path."""

    @abstractmethod
    def _unwrap(self, layer: Any) -> Any:
        """The base linear a LoRA layer wraps."""

    @abstractmethod
    def close(self) -> None:
        """Release what the worker thread holds of the engine (last thing the thread does)."""

    def _bare(self) -> None:
        """Every LoRA layer replaced by the linear it wraps."""
        self._set({path: self._unwrap(m) for path, m in self._lora_layers().items()})

    @contextmanager
    def using(self, swap: Swap | None) -> Iterator[None]:
        """The model with `swap`'s layers in (None: the bare base) for the body of the block."""
        if swap:
            self._set(swap)
        try:
            yield
        finally:
            if swap:
                self._bare()

    def _keep(self, spec: str, loaded: Result[tuple[Any, Any], str]) -> Result[None, str]:
        """Hold a loaded (model, tokenizer) and MODEL's context length; a refusal passes through."""

        def keep(pair: tuple[Any, Any]) -> None:
            self.net, self.tokenizer = pair
            self.context = context_of(spec)

        return loaded.map(keep)

    def _collect(self, attached: Result[Any, str]) -> Result[Swap, str]:
        try:
            return attached.map(lambda _: self._lora_layers())
        finally:
            self._bare()  # also after a refusal half-way through


def context_of(spec: str) -> int:
    """`max_position_embeddings` (or GPT-2's `n_positions`) of MODEL's config.json, 0 if absent."""
    config = sources.model_dir(spec).bind(sources.read_config).value_or({})
    value = config.get("max_position_embeddings") or config.get("n_positions") or 0
    return value if isinstance(value, int) else 0


class MlxEngine(Engine):
    name = "mlx"

    def load(self, spec: str, device: str | None, why: str) -> Result[None, str]:
        from finetune.engines.mlx import device as backend
        from finetune.engines.mlx.load import load_model

        info = backend.select(device)  # before loading: dtype="auto" depends on the device
        print(backend.describe(info, why), file=sys.stderr)
        return self._keep(spec, load_model(spec))

    def tokens(self, ids: list[int], **sampling: Any) -> Iterator[int]:
        from finetune.engines.mlx.generate import generate

        return generate(self.net, ids, **sampling)

    def prepare(self, directory: str) -> Result[Swap, str]:
        from finetune.core import quantization
        from finetune.engines.mlx.quantized import check_record
        from finetune.shell.export.adapters import attach, base_quantization

        def checked(record: dict | None) -> Result[Any, str]:
            want = quantization.parse_block(record, directory).value_or(None) if record else None
            return check_record(self.net, want, directory) if record else Success(self.net)

        return self._collect(base_quantization(directory).bind(checked).bind(lambda m: attach(m, directory)))

    def close(self) -> None:
        import mlx.core as mx

        # MLX gives each thread its own streams; a thread ending with them alive can abort the
        # process at exit ("terminate called without an active exception", 1 run in 4 here).
        mx.synchronize()
        mx.clear_streams()

    def _lora_layers(self) -> dict[str, Any]:
        from finetune.engines.mlx.lora import LoRALinear

        return {p: m for p, m in self.net.named_modules() if isinstance(m, LoRALinear)}

    def _unwrap(self, layer: Any) -> Any:
        return layer.linear

    def _set(self, modules: Mapping[str, Any]) -> None:
        from mlx.utils import tree_unflatten

        if modules:
            self.net.update_modules(tree_unflatten(list(modules.items())))


class TorchEngine(Engine):
    name = "torch"

    def load(self, spec: str, device: str | None, why: str) -> Result[None, str]:
        from finetune.engines.torch import device as torch_device
        from finetune.engines.torch import generate as torch_generate

        where = torch_device.pick(device)
        kept = self._keep(spec, torch_generate.load(spec, None, where))
        if isinstance(kept, Success):
            print(torch_device.describe(where, next(self.net.parameters()).dtype, why), file=sys.stderr)
        return kept

    def tokens(self, ids: list[int], **sampling: Any) -> Iterator[int]:
        from finetune.engines.torch.generate import generate

        return generate(self.net, ids, **sampling)

    def prepare(self, directory: str) -> Result[Swap, str]:
        from finetune.engines.torch.generate import with_adapter

        return self._collect(with_adapter(self.net, directory).map(lambda m: m.eval()))

    def close(self) -> None:
        """Nothing to release: torch's threads need no goodbye."""

    def _lora_layers(self) -> dict[str, Any]:
        from peft.tuners.tuners_utils import BaseTunerLayer

        return {p: m for p, m in self.net.named_modules() if isinstance(m, BaseTunerLayer)}

    def _unwrap(self, layer: Any) -> Any:
        return layer.get_base_layer()

    def _set(self, modules: Mapping[str, Any]) -> None:
        for path, module in modules.items():
            parent, _, leaf = path.rpartition(".")
            setattr(self.net.get_submodule(parent), leaf, module)

    def _bare(self) -> None:
        super()._bare()
        self.net.__dict__.pop("peft_config", None)  # as peft's own unload: the model is bare again


def make(backend: str) -> Engine:
    return TorchEngine() if backend == "torch" else MlxEngine()
