"""The MLX engine's decoding: KV-cached, one token at a time (prompts and text: `shell/generation.py`)."""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from typing import Any

PREFILL_CHUNK = 512  # prompt tokens per forward pass while filling the cache


def generate(
    model: Any,
    prompt_ids: Sequence[int],
    *,
    max_tokens: int,
    temp: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_ids: Collection[int] = (),
) -> Iterator[int]:
    """Token ids after `prompt_ids`, one at a time, until a stop id (not yielded) or `max_tokens`.

    The prompt fills the KV cache once; each later step feeds one token. Step i samples with the
    i-th key of the chain `key, k_i = split(key)` from `mx.random.key(seed)`, so a longer
    `max_tokens` extends the same sequence. The next step is queued (`mx.async_eval`) before the
    current token is read back, keeping the device busy while Python yields.
    """
    import mlx.core as mx

    from finetune.engines.mlx.sampling import sample

    if not prompt_ids:
        raise ValueError("generation needs at least one prompt token")
    cache = model.make_cache()
    key = mx.random.key(seed)
    stops = frozenset(stop_ids)

    def step(ids: mx.array, key: mx.array) -> mx.array:
        logits = model(ids[None], cache=cache)[0, -1]  # (V,) logits of the last position only
        return sample(logits, temp=temp, top_p=top_p, key=key)

    prompt = mx.array(list(prompt_ids), dtype=mx.int32)
    for start in range(0, prompt.size - 1, PREFILL_CHUNK):  # all but the last prompt token
        model(prompt[None, start : min(start + PREFILL_CHUNK, prompt.size - 1)], cache=cache)
        mx.eval([(c.keys, c.values) for c in cache])  # fills the cache; logits are never computed
    key, sub = mx.random.split(key)
    token = step(prompt[-1:], sub)
    mx.async_eval(token)
    for n in range(max_tokens):
        following = None
        if n + 1 < max_tokens:
            key, sub = mx.random.split(key)
            following = step(token.reshape(1).astype(mx.int32), sub)
            mx.async_eval(following)
        value = token.item()
        if value in stops:
            return
        yield value
        token = following
