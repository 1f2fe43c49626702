"""Whether a transformers model keeps packed documents apart.

transformers builds block-diagonal causal attention from position ids that restart (when no
attention mask is passed) for the architectures whose masks go through `masking_utils`; others
would let a document attend to the one before it. A two-document probe tells which.
"""

from __future__ import annotations

import torch

from finetune.engines.torch.lora import Lora


@torch.no_grad()
def supported(model: Lora, device: torch.device) -> bool:
    """Does document 2 of a packed row see what it sees alone (to float tolerance)?"""
    vocab = model.lm.config.vocab_size
    first = torch.arange(3, 8, device=device) % vocab
    second = torch.arange(11, 17, device=device) % vocab
    inputs = torch.cat([first, second])[None]
    positions = torch.cat([torch.arange(5), torch.arange(6)]).to(device)[None]
    was_training = model.training
    model.eval()
    try:
        packed = model.hidden(inputs, positions)[0, 5:].float()
        alone = model.hidden(second[None])[0].float()
    finally:
        model.train(was_training)
    scale = alone.abs().max().clamp(min=1e-6)
    return bool(((packed - alone).abs().max() / scale) < 1e-2)
