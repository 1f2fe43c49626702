"""What validate needs to know about a model the MLX engine does not implement, read from
transformers itself: the config, and the model built on the `meta` device (no memory, no weights).

The torch engine trains every architecture transformers has; the registry (`core/architectures`)
describes only the MLX engine's. For the others the block's linear layers, sizes and parameter
count come from transformers' own module tree.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from returns.result import Failure, Result, Success

from finetune.core.modelinfo import ModelFacts
from finetune.engines.torch import lora as tmodel

CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def skeleton_facts(directory: Path, spec: str) -> Result[ModelFacts, str]:
    """`ModelFacts` of any causal LM transformers knows; a Failure naming what it does not know."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
    except (ValueError, KeyError) as err:  # an unknown model_type
        first = str(err).strip().splitlines()[0][:200]
        return Failure(f"{spec}: transformers {transformers.__version__} does not know this model ({first}); "
                       "upgrade transformers or use a supported model")
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            lm = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except ValueError as err:  # a model_type with no causal-LM head
        first = str(err).strip().splitlines()[0][:200]
        return Failure(f"{spec}: transformers has no causal language model for model_type "
                       f"{config.model_type!r} ({first})")
    found = tmodel.block_list(lm)
    if found is None:
        return Failure(f"{spec}: found no list of transformer blocks in {type(lm).__name__}; "
                       "the torch engine cannot place LoRA on it")
    linears = tmodel.linear_shapes(found[1][0])
    vocab, hidden = lm.get_input_embeddings().weight.shape
    heads = int(getattr(config, "num_attention_heads", 0) or 1)
    context = next((int(v) for f in CONTEXT_FIELDS if isinstance(v := getattr(config, f, None), int) and v > 0), 2048)
    return Success(ModelFacts(
        model_type=config.model_type, hidden_size=int(hidden), num_layers=len(found[1]), num_heads=heads,
        num_kv_heads=int(getattr(config, "num_key_value_heads", 0) or heads),
        head_dim=int(getattr(config, "head_dim", 0) or hidden // heads),
        intermediate_size=int(getattr(config, "intermediate_size", 0) or max(o for _, o in linears.values())),
        vocab_size=int(vocab), context_length=context,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        linears=tuple((k, i, o) for k, (i, o) in linears.items()),
        counted=sum(p.numel() for p in lm.parameters()),
    ))
