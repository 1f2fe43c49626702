"""`ft generate --backend torch`: a transformers model (with one of our adapters through peft),
KV-cached decoding in our own loop, the MLX engine's sampling rules.

Prompts, stop tokens and streamed text are the engine-free `shell/generation.py`; loading is `load.py`.
Greedy decoding gives the MLX engine's tokens (a test compares them on `tiny`); seeded sampling
repeats itself for a seed, but draws from torch's generator, so its text differs from MLX's.
"""

from __future__ import annotations

import inspect
from collections.abc import Collection, Iterator, Sequence

import torch
from torch import nn

PREFILL_CHUNK = 512  # prompt tokens per forward pass while filling the cache


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_ids: Sequence[int],
    *,
    max_tokens: int,
    temp: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_ids: Collection[int] = (),
) -> Iterator[int]:
    """Token ids after `prompt_ids`, one at a time, until a stop id (not yielded) or `max_tokens`.

    The prompt fills transformers' DynamicCache once (logits only for its last token); each later
    step feeds one token. Sampling draws from a CPU generator seeded with `seed`.
    """
    from transformers import DynamicCache

    if not prompt_ids:
        raise ValueError("generation needs at least one prompt token")
    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    draws = torch.Generator().manual_seed(seed)
    stops = frozenset(stop_ids)

    # transformers 5.2x renamed `past_key_values` to `cache` (the old name warns, then goes).
    named = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def last_logits(ids: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=ids[None], use_cache=True, logits_to_keep=1, **{named: cache})
        return out.logits[0, -1]  # (V,)

    prompt = torch.tensor(list(prompt_ids), dtype=torch.long, device=device)
    for start in range(0, len(prompt) - 1, PREFILL_CHUNK):  # all but the last prompt token
        last_logits(prompt[start : min(start + PREFILL_CHUNK, len(prompt) - 1)])
    logits = last_logits(prompt[-1:])
    for n in range(max_tokens):
        token = sample(logits, temp=temp, top_p=top_p, generator=draws)
        if token in stops:
            return
        yield token
        if n + 1 < max_tokens:
            logits = last_logits(torch.tensor([token], dtype=torch.long, device=device))


def sample(logits: torch.Tensor, *, temp: float, top_p: float, generator: torch.Generator) -> int:
    """One token id from logits (V,): argmax at temp 0, else temperature then top-p, as the MLX
    engine's `sampling.sample` (the same nucleus: tokens tied with the last kept one stay)."""
    assert temp >= 0.0 and 0.0 <= top_p <= 1.0, (temp, top_p)
    if temp == 0.0:
        return int(torch.argmax(logits))
    scaled = logits.float().cpu() / temp
    if top_p < 1.0:
        scaled = nucleus(scaled, top_p)
    return int(torch.multinomial(torch.softmax(scaled, dim=-1), 1, generator=generator))


def nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """`logits` (V,) with every token outside the top-p nucleus set to -inf."""
    ranked, _ = torch.sort(logits, descending=True)
    probs = torch.softmax(ranked, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass strictly ahead of each ranked token
    kept = max(int((before < top_p).sum()), 1)  # the top token always stays
    cutoff = ranked[kept - 1]  # the smallest kept logit
    return torch.where(logits >= cutoff, logits, torch.tensor(float("-inf")))
