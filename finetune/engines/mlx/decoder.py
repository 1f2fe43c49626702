"""The one decoder: every architecture of the registry, read from its row, HF module names.

A row (`core/arch_rows.py`) names the modules (`model.layers.{i}.self_attn.q_proj`,
`transformer.h.{i}.attn.c_attn`, `gpt_neox.layers.{i}.attention.query_key_value`) and says how
the family computes; `args_from_config` resolves a config.json into that `Decoder` spec.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import mlx.core as mx
import mlx.nn as nn

from finetune.core import architectures
from finetune.core.arch_rows import Decoder
from finetune.engines.mlx.attention import (
    KVCache,
    attention_mask,
    cache_offset,
    packed_mask,
    softcapped_attention,
)
from finetune.engines.mlx.base import CausalLM
from finetune.engines.mlx.rope import RoPE

# gelu_new / gelu_pytorch_tanh / gelu_fast are 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3))) = gelu_approx.
ACTIVATIONS: dict[str, Callable[[mx.array], mx.array]] = {
    "silu": nn.silu, "gelu": nn.gelu, "gelu_new": nn.gelu_approx, "gelu_pytorch_tanh": nn.gelu_approx,
    "gelu_fast": nn.gelu_approx, "relu": nn.relu,
}


def args_from_config(config: Mapping) -> Decoder:
    """The row's reading of a HF config.json; KeyError/ValueError for what we cannot run."""
    return architectures.decoder(config)


class Norm(nn.Module):
    """RMSNorm (weight applied as `offset + w`: Gemma's 1) or LayerNorm with a bias."""

    def __init__(self, dims: int, s: Decoder):
        super().__init__()
        self.weight = mx.zeros((dims,)) if s.offset else mx.ones((dims,))
        if s.norm == "layer":
            self.bias = mx.zeros((dims,))
        self._rms, self._offset, self._eps = s.norm == "rms", s.offset, s.eps

    def __call__(self, x: mx.array) -> mx.array:
        if self._rms:
            w = self.weight + self._offset if self._offset else self.weight
            return mx.fast.rms_norm(x, w, self._eps)
        return mx.fast.layer_norm(x, self.weight, self.bias, self._eps)


class Attention(nn.Module):
    """Grouped-query self-attention: separate or fused q/k/v, optional q/k norms, rotary positions."""

    def __init__(self, s: Decoder, index: int):
        super().__init__()
        n, d, hd = s.names, s.hidden, s.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = s.heads, s.kv_heads, hd
        q, k = s.heads * hd, s.kv_heads * hd
        if n.qkv:
            setattr(self, n.qkv, nn.Linear(d, q + 2 * k, bias=s.qkv_bias))
        else:
            setattr(self, n.q, nn.Linear(d, q, bias=s.qkv_bias))
            setattr(self, n.k, nn.Linear(d, k, bias=s.qkv_bias))
            setattr(self, n.v, nn.Linear(d, k, bias=s.qkv_bias))
        setattr(self, n.o, nn.Linear(q, d, bias=s.o_bias))
        if s.qk_norm:
            self.q_norm = Norm(hd if s.qk_norm == "head" else q, s)
            self.k_norm = Norm(hd if s.qk_norm == "head" else k, s)
        self._names, self._qk_norm, self.scale, self._cap = n, s.qk_norm, s.query_scale, s.attn_softcap
        self._rope = RoPE(s.ropes[index], hd)

    def _project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """q (B, T, Q), k and v (B, T, K) in HF's layout."""
        n = self._names
        if not n.qkv:
            return getattr(self, n.q)(x), getattr(self, n.k)(x), getattr(self, n.v)(x)
        qkv = getattr(self, n.qkv)(x)
        if n.qkv_order == "heads":  # GPT-NeoX: (B, T, H, 3 * hd), each head's [q k v]
            b, t, _ = x.shape
            q, k, v = mx.split(qkv.reshape(b, t, self.n_heads, 3 * self.head_dim), 3, axis=-1)
            return q.reshape(b, t, -1), k.reshape(b, t, -1), v.reshape(b, t, -1)
        q_end = self.n_heads * self.head_dim
        return mx.split(qkv, [q_end, q_end + self.n_kv_heads * self.head_dim], axis=-1)

    def __call__(
        self, x: mx.array, mask, cache: KVCache | None = None, positions: mx.array | None = None
    ) -> mx.array:
        b, t, _ = x.shape
        q, k, v = self._project(x)
        if self._qk_norm == "full":  # OLMo 2: over the whole projection, before the head split
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.reshape(b, t, self.n_heads, -1)  # (B, T, H, hd)
        k = k.reshape(b, t, self.n_kv_heads, -1)
        if self._qk_norm == "head":  # Qwen3, Gemma 3: per head, over head_dim
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)  # (B, H|KV, T, hd)
        v = v.reshape(b, t, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q, k = self._rope(q, offset, positions), self._rope(k, offset, positions)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, KV, S, hd)
        if self._cap:
            out = softcapped_attention(q, k, v, self.scale, mask, self._cap)
        else:
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)  # (B, H, T, hd)
        return getattr(self, self._names.o)(out.transpose(0, 2, 1, 3).reshape(b, t, -1))  # (B, T, D)


class MLP(nn.Module):
    """Gated `down(act(gate x) * up x)` (gate and up separate or fused) or `down(act(up x))`."""

    def __init__(self, s: Decoder):
        super().__init__()
        n, d, f = s.names, s.hidden, s.intermediate
        if n.gate_up:
            setattr(self, n.gate_up, nn.Linear(d, 2 * f, bias=s.mlp_bias))
        else:
            if n.gate:
                setattr(self, n.gate, nn.Linear(d, f, bias=s.mlp_bias))
            setattr(self, n.up, nn.Linear(d, f, bias=s.mlp_bias))
        setattr(self, n.down, nn.Linear(f, d, bias=s.mlp_bias))
        self._names, self._act = n, ACTIVATIONS[s.act]

    def __call__(self, x: mx.array) -> mx.array:
        n = self._names
        if n.gate_up:
            gate, up = mx.split(getattr(self, n.gate_up)(x), 2, axis=-1)
            return getattr(self, n.down)(self._act(gate) * up)
        if n.gate:
            return getattr(self, n.down)(self._act(getattr(self, n.gate)(x)) * getattr(self, n.up)(x))
        return getattr(self, n.down)(self._act(getattr(self, n.up)(x)))


class Block(nn.Module):
    """x + attn(norm x) (optionally normed after), then + mlp(norm .); or both from x (parallel)."""

    def __init__(self, s: Decoder, index: int):
        super().__init__()
        n = s.names
        setattr(self, n.attn, Attention(s, index))
        setattr(self, n.mlp, MLP(s))
        for name in (n.attn_in, n.attn_out, n.mlp_in, n.mlp_out):
            if name:
                setattr(self, name, Norm(s.hidden, s))
        self._names, self._parallel, self._residual = n, s.parallel, s.residual_scale

    def _norm(self, name: str, x: mx.array) -> mx.array:
        return getattr(self, name)(x) if name else x

    def __call__(
        self, x: mx.array, mask, cache: KVCache | None = None, positions: mx.array | None = None
    ) -> mx.array:
        n = self._names
        a = getattr(self, n.attn)(self._norm(n.attn_in, x), mask, cache, positions)
        a = self._norm(n.attn_out, a)
        if self._parallel:
            return x + a + getattr(self, n.mlp)(self._norm(n.mlp_in, x))
        h = x + (a * self._residual if self._residual != 1.0 else a)
        m = self._norm(n.mlp_out, getattr(self, n.mlp)(self._norm(n.mlp_in, h)))
        return h + (m * self._residual if self._residual != 1.0 else m)


class Backbone(nn.Module):
    """HF's base model (`model.`, `transformer.`, `gpt_neox.`): embeddings, blocks, final norm."""

    def __init__(self, s: Decoder):
        super().__init__()
        n = s.names
        setattr(self, n.embed, nn.Embedding(s.vocab, s.hidden))
        if n.positions:
            setattr(self, n.positions, nn.Embedding(s.context, s.hidden))
        setattr(self, n.layers, [Block(s, i) for i in range(s.layers)])
        setattr(self, n.final_norm, Norm(s.hidden, s))
        self._names, self._windows, self._scale, self._context = n, s.windows, s.embed_scale, s.context

    def __call__(
        self,
        ids: mx.array,
        mask=None,
        cache: list[KVCache] | None = None,
        segments: mx.array | None = None,
        positions: mx.array | None = None,
    ) -> mx.array:
        n = self._names
        t, offset = ids.shape[1], cache_offset(cache)
        h = getattr(self, n.embed)(ids)  # (B, T, D)
        if self._scale != 1.0:
            h = h * self._scale
        if n.positions:
            if offset + t > self._context:
                raise ValueError(f"sequence of {offset + t} tokens exceeds n_positions={self._context}")
            # Learned positions count from the start of the row, pads included, as HF's forward does;
            # packed rows bring their own (restarting at each document).
            h = h + getattr(self, n.positions)(mx.arange(offset, offset + t) if positions is None else positions)
        if segments is not None:  # packed rows: attention stays within each document
            masks = {w: packed_mask(segments, w) for w in set(self._windows)}
        else:
            masks = {w: attention_mask(t, offset, mask, w) for w in set(self._windows)}
        for i, layer in enumerate(getattr(self, n.layers)):
            h = layer(h, masks[self._windows[i]], cache[i] if cache else None, positions)
        return getattr(self, n.final_norm)(h)


class Model(CausalLM):
    """Causal LM: `model(ids (B, T), mask (B, S) of 1/0 or None, cache) -> logits (B, T, vocab)`."""

    def __init__(self, args: Decoder):
        super().__init__()
        self.args = args
        *outer, name = args.names.backbone.split(".")  # Gemma 3 image-text: `model.language_model`
        parent = self
        for part in outer:
            setattr(parent, part, nn.Module())
            parent = getattr(parent, part)
        setattr(parent, name, Backbone(args))
        if not args.tied:  # lm_head (GPT-NeoX: embed_out)
            setattr(self, args.names.head, nn.Linear(args.hidden, args.vocab, bias=False))

    @property
    def backbone(self) -> nn.Module:
        found = self
        for part in self.args.names.backbone.split("."):
            found = getattr(found, part)
        return found

    @property
    def embedding(self) -> nn.Embedding:
        return getattr(self.backbone, self.args.names.embed)

    @property
    def layers(self) -> list[Block]:
        return getattr(self.backbone, self.args.names.layers)
