"""Tiny random transformers models (float32, real HF layout) for parity tests.

Weights are redrawn with a larger spread than HF's init (std 0.02) so that logits are of order one
and a wrong transpose, head split or RoPE convention shows up far above float32 noise.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

_LLAMA_DIMS = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=256,
)
# original_max_position_embeddings=64 puts head_dim 16's wavelengths in all three llama3 bands.
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

VARIANTS = (
    "llama",
    "llama-tied",
    "llama-bias",
    "llama3",
    "llama-linear",
    "mistral",
    "qwen2",
    "qwen2-tied",
    "qwen2-sliding",
    "gpt2",
    "gpt2-untied",
)


def tiny_config(variant: str) -> PretrainedConfig:
    """The HF config of one named tiny variant (see VARIANTS)."""
    match variant:
        case "llama":
            return LlamaConfig(**_LLAMA_DIMS, rope_theta=500.0)
        case "llama-tied":
            return LlamaConfig(**_LLAMA_DIMS, tie_word_embeddings=True)
        case "llama-bias":
            return LlamaConfig(**_LLAMA_DIMS, attention_bias=True, mlp_bias=True, head_dim=24)
        case "llama3":
            return LlamaConfig(**_LLAMA_DIMS, rope_parameters=dict(LLAMA3_ROPE))
        case "llama-linear":
            return LlamaConfig(
                **_LLAMA_DIMS,
                rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
            )
        case "mistral":
            return MistralConfig(**_LLAMA_DIMS, sliding_window=8)
        case "qwen2":
            return Qwen2Config(**_LLAMA_DIMS)
        case "qwen2-tied":
            return Qwen2Config(**_LLAMA_DIMS, tie_word_embeddings=True)
        case "qwen2-sliding":  # layer 0 full attention, layer 1 a window of 6
            return Qwen2Config(
                **_LLAMA_DIMS, use_sliding_window=True, sliding_window=6, max_window_layers=1
            )
        case "gpt2":
            return GPT2Config(
                n_embd=64,
                n_layer=2,
                n_head=4,
                vocab_size=256,
                n_positions=128,
                bos_token_id=0,
                eos_token_id=0,
            )
        case "gpt2-untied":
            return GPT2Config(
                n_embd=64,
                n_layer=2,
                n_head=4,
                vocab_size=256,
                n_positions=128,
                n_inner=96,
                tie_word_embeddings=False,
                bos_token_id=0,
                eos_token_id=0,
            )
    raise ValueError(f"unknown variant {variant!r}")


_CLASSES = {
    "llama": LlamaForCausalLM,
    "mistral": MistralForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "gpt2": GPT2LMHeadModel,
}


def build_hf(variant: str, seed: int = 0) -> PreTrainedModel:
    """A float32 HF model in eval mode with reproducible, order-one random weights."""
    config = tiny_config(variant)
    torch.manual_seed(seed)
    model = _CLASSES[config.model_type](config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".weight") and ("norm" in name or ".ln_" in name):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))  # norm gains near one
            else:
                p.normal_(0.0, 0.15)
    return model


def save_hf(model: PreTrainedModel, directory: Path, max_shard_size: str | None = None) -> Path:
    """`save_pretrained` in safetensors; a small `max_shard_size` gives shards plus an index."""
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)  # transformers 5 always writes safetensors
    return directory
