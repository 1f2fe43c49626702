"""What every causal LM here shares: logits, hidden states, the (tied) head, the KV cache."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from finetune.engines.mlx.attention import KVCache


class CausalLM(nn.Module):
    """`model(ids (B, T), mask (B, S) of 1/0 or None, cache) -> logits (B, T, vocab)`.

    A model sets `args` (a `Decoder` spec: `tied`, `logits_scale`, `final_softcap`), its HF-named
    backbone, and `lm_head` when untied; `backbone` and `embedding` name the backbone and its token
    embedding.
    """

    backbone: nn.Module
    embedding: nn.Embedding

    def __call__(
        self, ids: mx.array, mask: mx.array | None = None, cache: list[KVCache] | None = None
    ) -> mx.array:
        return self.head(self.backbone(ids, mask, cache))  # (B, T, vocab)

    def hidden(
        self, ids: mx.array, segments: mx.array | None = None, positions: mx.array | None = None
    ) -> mx.array:
        """Final hidden states (B, T, D); packed rows pass per-token `segments` and `positions`."""
        return self.backbone(ids, segments=segments, positions=positions)

    def head(self, h: mx.array) -> mx.array:
        """Hidden states (..., D) -> logits (..., vocab): Granite's divisor, Gemma 2's soft-cap."""
        logits = self.embedding.as_linear(h) if self.args.tied else getattr(self, self.args.names.head)(h)
        if self.args.logits_scale != 1.0:
            logits = logits / self.args.logits_scale
        if self.args.final_softcap:
            logits = mx.tanh(logits / self.args.final_softcap) * self.args.final_softcap
        return logits

    def make_cache(self) -> list[KVCache]:
        """An empty per-layer cache for incremental decoding."""
        return [KVCache() for _ in self.layers]
