"""GPT-2 and DialoGPT: learned positions, LayerNorm, tanh-GELU, tied head, HF names.

Parameter names keep the HF `GPT2LMHeadModel` layout, `transformer.` prefix included
(`transformer.h.0.attn.c_attn.weight`); Conv1D weights are stored as nn.Linear's (out, in).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import mlx.core as mx
import mlx.nn as nn
from msgspec import Struct

from finetune.core import architectures
from finetune.models.attention import KVCache, attention_mask, cache_offset, packed_mask
from finetune.models.base import CausalLM

# gelu_new / gelu_pytorch_tanh are exactly 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3))) = gelu_approx.
ACTIVATIONS: dict[str, Callable[[mx.array], mx.array]] = {
    "gelu_new": nn.gelu_approx,
    "gelu_pytorch_tanh": nn.gelu_approx,
    "gelu": nn.gelu,
}


class GPT2Args(Struct, frozen=True, kw_only=True):
    """The fields of a HF GPT-2 config we use, with HF's defaults resolved."""

    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    n_inner: int
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    scale_attn_weights: bool = True
    tie_word_embeddings: bool = True


def args_from_config(config: Mapping) -> GPT2Args:
    """GPT2Args from a HF config.json mapping; ValueError for what we do not implement."""
    act = config.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise ValueError(
            f"GPT-2 activation {act!r} is not supported; supported: {', '.join(ACTIVATIONS)}"
        )
    if config.get("scale_attn_by_inverse_layer_idx", False):
        raise ValueError("GPT-2 scale_attn_by_inverse_layer_idx is not supported")
    if config.get("add_cross_attention", False):
        raise ValueError("GPT-2 cross-attention is not supported")
    d = architectures.GPT2.read("gpt2", config)  # sizes: the architecture registry's reading
    return GPT2Args(
        vocab_size=d.vocab,
        n_positions=d.context,
        n_embd=d.hidden,
        n_layer=d.layers,
        n_head=d.heads,
        n_inner=d.intermediate,
        layer_norm_epsilon=config.get("layer_norm_epsilon", 1e-5),
        activation_function=act,
        scale_attn_weights=config.get("scale_attn_weights", True),
        tie_word_embeddings=d.tied,
    )


class Attention(nn.Module):
    """Multi-head self-attention with a fused q/k/v projection."""

    def __init__(self, args: GPT2Args):
        super().__init__()
        d = args.n_embd
        self.n_head = args.n_head
        self.scale = (d // args.n_head) ** -0.5 if args.scale_attn_weights else 1.0
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)

    def __call__(self, x: mx.array, mask, cache: KVCache | None = None) -> mx.array:
        b, t, _ = x.shape
        qkv = self.c_attn(x).reshape(b, t, 3, self.n_head, -1)  # (B, T, 3, H, hd)
        q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # (B, H, T, hd)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, H, S, hd)
        out = mx.fast.scaled_dot_product_attention(
            q, k, v, scale=self.scale, mask=mask
        )  # (B, H, T, hd)
        return self.c_proj(out.transpose(0, 2, 1, 3).reshape(b, t, -1))  # (B, T, D)


class MLP(nn.Module):
    """c_proj(act(c_fc(x)))."""

    def __init__(self, args: GPT2Args):
        super().__init__()
        self.c_fc = nn.Linear(args.n_embd, args.n_inner)
        self.c_proj = nn.Linear(args.n_inner, args.n_embd)
        self._act = ACTIVATIONS[args.activation_function]

    def __call__(self, x: mx.array) -> mx.array:
        return self.c_proj(self._act(self.c_fc(x)))


class Block(nn.Module):
    """Pre-LayerNorm block: x + attn(ln_1(x)), then + mlp(ln_2(.))."""

    def __init__(self, args: GPT2Args):
        super().__init__()
        self.ln_1 = nn.LayerNorm(args.n_embd, eps=args.layer_norm_epsilon)
        self.attn = Attention(args)
        self.ln_2 = nn.LayerNorm(args.n_embd, eps=args.layer_norm_epsilon)
        self.mlp = MLP(args)

    def __call__(self, x: mx.array, mask, cache: KVCache | None = None) -> mx.array:
        h = x + self.attn(self.ln_1(x), mask, cache)
        return h + self.mlp(self.ln_2(h))


class GPT2Model(nn.Module):
    """HF's `transformer.` submodule: token and position embeddings, blocks, final LayerNorm."""

    def __init__(self, args: GPT2Args):
        super().__init__()
        self.wte = nn.Embedding(args.vocab_size, args.n_embd)
        self.wpe = nn.Embedding(args.n_positions, args.n_embd)
        self.h = [Block(args) for _ in range(args.n_layer)]
        self.ln_f = nn.LayerNorm(args.n_embd, eps=args.layer_norm_epsilon)
        self._n_positions = args.n_positions

    def __call__(
        self,
        ids: mx.array,
        mask=None,
        cache: list[KVCache] | None = None,
        segments: mx.array | None = None,
        positions: mx.array | None = None,
    ) -> mx.array:
        t, offset = ids.shape[1], cache_offset(cache)
        if offset + t > self._n_positions:
            raise ValueError(
                f"sequence of {offset + t} tokens exceeds n_positions={self._n_positions}"
            )
        # Positions count from the start of the row, pads included, as HF's forward does;
        # packed rows bring their own (restarting at each document).
        if positions is None:
            positions = mx.arange(offset, offset + t)
        h = self.wte(ids) + self.wpe(positions)  # (B, T, D)
        attn_mask = packed_mask(segments) if segments is not None else attention_mask(t, offset, mask)
        for i, block in enumerate(self.h):
            h = block(h, attn_mask, cache[i] if cache else None)
        return self.ln_f(h)


class Model(CausalLM):
    """Causal LM: `model(ids (B, T), mask (B, S) of 1/0 or None, cache) -> logits (B, T, vocab)`."""

    def __init__(self, args: GPT2Args):
        super().__init__()
        self.args = args
        self.transformer = GPT2Model(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.n_embd, args.vocab_size, bias=False)

    @property
    def backbone(self) -> nn.Module:
        return self.transformer

    @property
    def embedding(self) -> nn.Embedding:
        return self.transformer.wte

    @property
    def layers(self) -> list[Block]:
        return self.transformer.h
