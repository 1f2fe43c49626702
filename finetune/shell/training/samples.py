"""Before/after samples for `ft train quick`: one held-out row, answered greedily."""

from __future__ import annotations

from typing import Any

from returns.result import Success

from finetune import engines
from finetune.core import prepare
from finetune.files import datasets
from finetune.shell.data import check
from finetune.shell.generation import build_prompt, decoder

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
    engine = engines.get(prepared.engine)
    model, precision = engine.sampler(prepared)  # what decodes, in the precision it trains in
    model.eval()
    with precision():
        ids = list(engine.generate(model, prompt.ids, max_tokens=MAX_TOKENS, stop_ids=prompt.stop_ids))
    model.train()
    answer = decoder(tok)(ids).strip()
    if before is None:
        print(f"\n[{title}] prompt:\n{history[-1].content.rstrip()}")
        print(f"expected: {sample.messages[-1].content}")
    print(f"[{title}] model: {answer or '(nothing)'}\n", flush=True)
    return answer
