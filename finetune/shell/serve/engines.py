"""A base model of either engine with LoRA adapters swapped in per request, never reloaded.

An adapter is attached by the engine's own loader (its checks, its refusals), its LoRA layers are
kept, and the base's layers are put back; a request runs with one adapter's layers swapped in.
The layers wrap the base's own linears, so nothing is copied and the base is shared by all.
Only the worker thread calls these (the swap mutates the model).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from returns.result import Failure, Result

from finetune import engines
from finetune.files import sources

Swap = Mapping[str, Any]  # module path -> that adapter's LoRA layer


class Engine:
    """What the server needs of a loaded model, over either engine's protocol."""

    tokenizer: Any = None
    context = 0  # most positions the model takes (0: not known)

    def __init__(self, name: str):
        self.name = name
        self.engine = engines.get(name)

    def load(self, spec: str, device: str | None, why: str) -> Result[None, str]:
        """Load MODEL (on the calling thread: the worker), printing the backend line."""

        def keep(pair: tuple[Any, Any]) -> None:
            self.net, self.tokenizer = pair
            self.context = context_of(spec)

        say = lambda line: print(line, file=sys.stderr)  # noqa: E731
        return self.engine.load(spec, device=device, why=why, say=say).map(keep)

    def tokens(self, ids: list[int], **sampling: Any) -> Iterator[int]:
        """The engine's own `generate`: token ids after `ids`, one at a time."""
        return self.engine.generate(self.net, ids, **sampling)

    def prepare(self, directory: str) -> Result[Swap, str]:
        """The adapter's LoRA layers, checked against the base; the base is left bare."""
        from finetune.files.adapters import is_full

        if is_full(directory):  # its weights would replace the shared base's
            return Failure(f"{directory}: a full fine-tune replaces the base's own weights, so it is not served beside "
                           f"the base; serve its HuggingFace model instead: ft serve {directory}/model")
        try:
            return self.engine.attach(self.net, directory).map(lambda _: self.engine.adapter_layers(self.net))
        finally:
            self.engine.bare(self.net)  # also after a refusal half-way through

    def close(self) -> None:
        """Release what the worker thread holds of the engine (last thing the thread does)."""
        self.engine.release()

    @contextmanager
    def using(self, swap: Swap | None) -> Iterator[None]:
        """The model with `swap`'s layers in (None: the bare base) for the body of the block."""
        if swap:
            self.engine.put_layers(self.net, swap)
        try:
            yield
        finally:
            if swap:
                self.engine.bare(self.net)


def context_of(spec: str) -> int:
    """`max_position_embeddings` (or GPT-2's `n_positions`) of MODEL's config.json, 0 if absent."""
    config = sources.model_dir(spec).bind(sources.read_config).value_or({})
    value = config.get("max_position_embeddings") or config.get("n_positions") or 0
    return value if isinstance(value, int) else 0


def make(backend: str) -> Engine:
    return Engine("torch" if backend == "torch" else "mlx")
