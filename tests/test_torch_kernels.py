"""`engines.torch.kernels.install` leaves a peft LoRA Llama computing the same thing: the same
logits and LoRA gradients as peft's and transformers' own forward, in float32 to rounding and
in bfloat16 (the engine's autocast) to bf16 rounding; DoRA layers keep peft's forward."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from finetune.engines.torch import kernels

torch.set_num_threads(1)  # agents share two cores here


def lora_llama(dtype: torch.dtype, dora: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=97, max_position_embeddings=64, attn_implementation="sdpa")
    lm = get_peft_model(LlamaForCausalLM(config).to(dtype), LoraConfig(r=4, lora_alpha=32, target_modules="all-linear",
                                                                        use_dora=dora, lora_dropout=0.0))
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p, dtype=torch.float32) * 0.1)  # B ≠ 0: the adapters count
                p.data = p.data.float()
    for m in lm.modules():
        if hasattr(m, "cast_input_dtype_enabled") and dtype != torch.float32:
            m.cast_input_dtype_enabled = False  # as the engine runs a half-precision base
    return lm


def run(lm, ids, dtype, positions=None):
    lm.zero_grad()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        logits = lm(input_ids=ids, position_ids=positions).logits.float()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1))
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in lm.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("packed", [False, True])  # packed rows: positions restart, a block-diagonal mask
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 2e-5), (torch.bfloat16, 6e-2)])
def test_installed_forms_give_peft_s_logits_and_gradients(dtype, tol, packed):
    plain = lora_llama(dtype)
    fast = copy.deepcopy(plain)
    installed = kernels.install(fast)
    assert installed == ["lora (14 layers)", "sdpa"]
    assert plain.config._attn_implementation == "sdpa" and fast.config._attn_implementation == kernels.ATTENTION
    ids = torch.randint(0, 97, (3, 24), generator=torch.Generator().manual_seed(1))
    positions = torch.cat([torch.arange(10), torch.arange(14)]).expand(3, 24) if packed else None
    (a, ga), (b, gb) = run(plain, ids, dtype, positions), run(fast, ids, dtype, positions)
    torch.testing.assert_close(b, a, rtol=tol, atol=tol * a.abs().max().item())
    assert ga.keys() == gb.keys() and len(ga) == 28
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], rtol=tol, atol=tol * ga[k].abs().max().item(), msg=k)


def test_dora_layers_keep_peft_s_forward():
    lm = lora_llama(torch.float32, dora=True)
    assert kernels.install(lm) == ["sdpa"]
