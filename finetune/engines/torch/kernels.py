"""Cheaper forms of two hot spots of the torch engine's LoRA step, the same maths (`install`).

Measured on the 2-core CPU (benchmarks/torch_step.py, benchmarks/README.md): a bf16 step spends
much of its non-matmul time in elementwise passes over `(B, T, D)` activations, each a parallel
region of its own, and in SDPA's bfloat16 backward.

- LoRA (peft's `lora.Linear` over an `nn.Linear`, no DoRA): `base(x) + B(A(dropout(x)))·s` becomes
  `base(x).addmm_(A(dropout(x))·s, Bᵀ)`: the scale on the rank-r activations and the add inside
  the matmul, not two passes over the output (and one more in the backward pass).
- Attention of a half-precision model on the CPU: SDPA in float32 (its bf16 backward is slower
  than the float32 one there); elsewhere, and in float32, transformers' own SDPA.

Not kept: `F.rms_norm` for Llama's RMSNorm (on the CPU it is the same composite ops, ~1% CPU time).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

_ADAPTER = "default"
ATTENTION = "finetune_sdpa"  # the attention implementation `install` gives a model
PARTS = ("lora", "sdpa")


def install(lm: nn.Module, parts: tuple[str, ...] = PARTS) -> list[str]:
    """Swap the fast forms (`parts` of them) into `lm` (a peft-wrapped transformers model) where
    they apply; which ones were installed."""
    done = []
    loras = [m for m in lm.modules() if "lora" in parts and _plain_lora(m)]
    for m in loras:
        m.forward = types.MethodType(_lora_forward, m)
    if loras:
        done.append(f"lora ({len(loras)} layers)")
    config = getattr(lm, "config", None)
    if "sdpa" in parts and getattr(config, "_attn_implementation", None) == "sdpa":
        _register_attention()
        config._attn_implementation = ATTENTION  # this model's layers only: the others keep "sdpa"
        done.append("sdpa")
    return done


def _plain_lora(m: nn.Module) -> bool:
    from peft.tuners.lora import layer

    return (type(m) is layer.Linear and type(m.base_layer) is nn.Linear and not m.fan_in_fan_out
            and list(m.lora_A) == [_ADAPTER] and not m.lora_variant and not m.use_dora.get(_ADAPTER, False))


def _lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """`base(x) + B(A(dropout(x)))·s` with the scale on (…, r) and the add in the matmul; peft's
    own forward for anything but one active plain adapter."""
    if args or kwargs or self.disable_adapters or self.merged or self.active_adapters != [_ADAPTER]:
        return type(self).forward(self, x, *args, **kwargs)
    flat = x.reshape(-1, x.shape[-1])  # 2-D from the start: the in-place add then hits no view
    out = self.base_layer(flat)
    a, b = self.lora_A[_ADAPTER].weight, self.lora_B[_ADAPTER].weight
    u = F.linear(self.lora_dropout[_ADAPTER](flat), a.to(x.dtype)) * self.scaling[_ADAPTER]  # (N, r)
    out.addmm_(u.to(out.dtype), b.t().to(out.dtype))
    return out.view(*x.shape[:-1], out.shape[-1])


def _sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA, in float32 for a half-precision model on the CPU."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.device.type != "cpu" or query.dtype not in (torch.bfloat16, torch.float16):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():  # an additive mask: the queries' dtype
        attention_mask = attention_mask.float()
    with torch.autocast("cpu", enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
    return out.to(query.dtype), weights


def _register_attention() -> None:
    """`ATTENTION`: `_sdpa` with SDPA's masks (registering a new name changes no other model)."""
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(ATTENTION, _sdpa)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
