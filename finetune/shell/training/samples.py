"""Before/after samples for `ft train quick`: one held-out row, answered greedily."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

from returns.result import Success

from finetune.core import prepare
from finetune.engines.mlx.generate import build_prompt, decoder
from finetune.shell.data import check, datasets

MAX_TOKENS = 48


def pick(recipe) -> Any:
    """The first usable row of the valid split (else train) with an assistant answer."""
    files = datasets.locate(recipe.data.path).unwrap()
    rows, _ = datasets.read_rows(files.get("valid", files["train"]))
    samples, _ = prepare.normalise_rows(rows[:50], recipe.data.format)
    for _, s in samples:
        if s.messages and s.messages[-1].role == "assistant":
            return s
    return None


def show(prepared, title: str, before: str | None = None) -> str | None:
    """Print the prompt's answer now (and the expected one); returns the answer."""
    recipe, tok = prepared.recipe, prepared.tokenizer
    sample = pick(recipe)
    if sample is None:
        return None
    template = check.template_for(recipe, sample.format, tok.chat_template or "")
    if not isinstance(template, Success):
        return None
    history = sample.messages[:-1]
    prompt = build_prompt(tok, messages=history, template=template.unwrap()).unwrap()
    model, generate, precision = _engine(prepared)
    model.eval()
    with precision:
        ids = list(generate(model, prompt.ids, max_tokens=MAX_TOKENS, stop_ids=prompt.stop_ids))
    model.train()
    answer = decoder(tok)(ids).strip()
    if before is None:
        print(f"\n[{title}] prompt:\n{history[-1].content.rstrip()}")
        print(f"expected: {sample.messages[-1].content}")
    print(f"[{title}] model: {answer or '(nothing)'}\n", flush=True)
    return answer


def _engine(prepared) -> tuple[Any, Any, Any]:
    """The model to sample from, the generate function of the engine that prepared it, and the
    precision context it computes in as it trains (torch: autocast for a half-precision base)."""
    if type(prepared).__module__ == "finetune.engines.torch.run":
        import torch

        from finetune.engines.torch.generate import generate

        half = prepared.model.half_precision()
        precision = torch.autocast(prepared.device.type, dtype=half, enabled=half is not None)
        return prepared.model.lm, generate, precision  # transformers' model with the peft layers in place
    from finetune.engines.mlx.generate import generate

    return prepared.model, generate, nullcontext()
