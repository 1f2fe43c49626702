"""The torch engine's side of evaluation: batched greedy decoding with a DynamicCache (left-padded
rows at their own positions), and a causal LM as the torch trainer's loss reads one."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch import nn

from finetune.core.evaluation import Done, extend_answers


@torch.no_grad()
def greedy(lm: nn.Module, prompts: Sequence[Sequence[int]], max_tokens: int, stop_ids: Sequence[int],
           done: Done, pad_id: int = 0, half: torch.dtype | None = None) -> list[list[int]]:
    """As the MLX engine's `greedy`: left-padded rows, masked padding, each row's own positions.
    `half`: autocast to this dtype (a half-precision base with float32 LoRA, during training)."""
    from transformers import DynamicCache

    device = next(lm.parameters()).device
    width = max(len(p) for p in prompts)
    pads = torch.tensor([width - len(p) for p in prompts], device=device)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = (torch.arange(width, device=device)[None] >= pads[:, None]).long()  # (B, T)
    positions = (torch.arange(width, device=device)[None] - pads[:, None]).clamp(min=0)  # (B, T)
    cache = DynamicCache(config=lm.config)
    named = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
    autocast = torch.autocast(device.type, dtype=half) if half is not None else nullcontext()

    def last_logits(step_ids: torch.Tensor, step_positions: torch.Tensor) -> torch.Tensor:
        with autocast:
            out = lm(input_ids=step_ids, attention_mask=mask, position_ids=step_positions, use_cache=True,
                     logits_to_keep=1, **{named: cache})
        return out.logits[:, -1]  # (B, V)

    logits = last_logits(ids, positions)
    step_positions = positions[:, -1:]
    out: list[list[int]] = [[] for _ in prompts]
    active = [True] * len(prompts)
    stops = frozenset(stop_ids)
    for _ in range(max_tokens):
        tokens = torch.argmax(logits, dim=-1)  # (B,)
        if not extend_answers(out, active, tokens.tolist(), stops, done):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        step_positions = step_positions + 1
        logits = last_logits(tokens[:, None], step_positions)
    return out


class Scorer(nn.Module):
    """A causal LM as the torch trainer's loss reads one (`hidden`, `head`), adapters or not."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def hidden(self, inputs: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        backbone = getattr(self.lm, self.lm.base_model_prefix)
        return backbone(input_ids=inputs, position_ids=positions, use_cache=False).last_hidden_state

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm.get_output_embeddings()(h)


