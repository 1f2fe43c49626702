"""Template invariants on random conversations, through a real byte-level BPE tokenizer.

For every template and both tokenizers (BOS added / no BOS): a generation prompt's ids are a prefix
of the whole conversation's; on that prefix only earlier assistant turns carry loss; the supervised
spans are exactly the assistant contents with their end-of-turn marker; never two BOS in a row;
rendering leaves its input alone.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finetune.core.records import Message, Sample
from finetune.core.templates import Jinja, render, render_prompt
from finetune.core.tokenize import Tokens, tokenize
from finetune.files.tokenizer import CHATML_TEMPLATE, encoder, load_tokenizer, specials, train_bpe


def _corpus() -> list[str]:
    words = (
        "hello",
        "world",
        "SELECT",
        "FROM",
        "WHERE",
        "name",
        "city",
        "fine",
        "thanks",
        "über",
        "日本",
    )
    return [
        f"{words[i % 11]} {words[(i * 7) % 11]}, {words[(i * 3) % 11]}? {i}\n" for i in range(300)
    ]


def _build() -> dict:
    with tempfile.TemporaryDirectory() as d:
        with_bos = train_bpe(_corpus(), Path(d) / "bos", vocab_size=400)
        no_bos = train_bpe(
            _corpus(), Path(d) / "nobos", vocab_size=400, chat_template=None, add_bos=False
        )
        return {"bos": load_tokenizer(with_bos), "nobos": load_tokenizer(no_bos)}


TOKENIZERS = _build()

CUSTOM = Jinja(
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
TEMPLATES = {
    "plain": "plain",
    "alpaca": "alpaca",
    "chatml": "chatml",
    "llama2": "llama2",
    "llama3": "llama3",
    "tokenizer": Jinja(CHATML_TEMPLATE),
    "custom": CUSTOM,
}


def expected_turn(name: str, content: str, eos: str) -> str:
    """The text an assistant turn trains under each template: its content and end-of-turn."""
    return {
        "plain": content + eos,
        "alpaca": content + eos,
        "chatml": content + "<|im_end|>",
        "llama2": f" {content.strip()} {eos}",
        "llama3": content.strip() + "<|eot_id|>",
        "tokenizer": content + "<|im_end|>",
        "custom": content + eos,
    }[name]


ALPHABET = st.sampled_from(list("abcxyzABC019 .,?!'\"-_\n\t") + list("éüßñøжЖλ日本中"))
content = st.text(ALPHABET, min_size=1, max_size=16).filter(lambda s: s.strip())


@st.composite
def conversations(draw) -> tuple[Message, ...]:
    """Optional system, then alternating user/assistant turns, ending with an assistant turn."""
    out = [Message("system", draw(content))] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        out += [Message("user", draw(content)), Message("assistant", draw(content))]
    return tuple(out)


def runs(tok, tokens: Tokens) -> list[str]:
    """Decoded maximal runs of supervised tokens, in order."""
    out, current = [], []
    for i, m in zip(tokens.ids, tokens.mask, strict=True):
        if m:
            current.append(i)
        elif current:
            out.append(current)
            current = []
    if current:
        out.append(current)
    return [tok.decode(r, skip_special_tokens=False) for r in out]


CASES = [(t, k) for t in TEMPLATES for k in TOKENIZERS]
PROPS = settings(deadline=None, max_examples=25)


@pytest.mark.parametrize(("template", "tok_name"), CASES)
@PROPS
@given(messages=conversations(), context=st.one_of(st.just(""), content))
def test_prompt_ids_are_a_prefix_and_only_earlier_turns_train(
    template, tok_name, messages, context
):
    """`context` is Alpaca's input: its own section there, folded into the first user turn elsewhere."""
    tok = TOKENIZERS[tok_name]
    sp, enc, t = specials(tok), encoder(tok), TEMPLATES[template]
    sample = Sample(format="instruction" if context else "chat", messages=messages, input=context)
    full = tokenize(render(sample, t, sp).unwrap(), enc, sp)
    assistants = [i for i, m in enumerate(messages) if m.role == "assistant"]
    for j, k in enumerate(assistants):
        prompt = tokenize(render_prompt(messages[:k], t, sp, context).unwrap(), enc, sp)
        n = len(prompt.ids)
        assert full.ids[:n] == prompt.ids
        assert full.mask[:n] == prompt.mask
        earlier = [expected_turn(template, messages[i].content, sp.eos) for i in assistants[:j]]
        assert runs(tok, prompt) == earlier
        assert len(full.ids) > n and full.mask[n:].count(1) > 0  # turn k itself is trained after it


@pytest.mark.parametrize(("template", "tok_name"), CASES)
@PROPS
@given(messages=conversations())
def test_supervised_spans_are_the_assistant_turns(template, tok_name, messages):
    tok = TOKENIZERS[tok_name]
    sp, enc, t = specials(tok), encoder(tok), TEMPLATES[template]
    sample = Sample(format="chat", messages=messages)
    turns = [expected_turn(template, m.content, sp.eos) for m in messages if m.role == "assistant"]

    full = tokenize(render(sample, t, sp, "assistant").unwrap(), enc, sp)
    assert runs(tok, full) == turns
    assert full.mask[0] == 0

    last = tokenize(render(sample, t, sp, "last-turn-only").unwrap(), enc, sp)
    assert last.ids == full.ids
    assert runs(tok, last) == turns[-1:]

    everything = tokenize(render(sample, t, sp, "all").unwrap(), enc, sp)
    assert everything.ids == full.ids
    assert everything.mask == (0,) + (1,) * (len(full.ids) - 1)


@pytest.mark.parametrize(("template", "tok_name"), CASES)
@PROPS
@given(messages=conversations())
def test_no_double_bos(template, tok_name, messages):
    tok = TOKENIZERS[tok_name]
    sp, enc, t = specials(tok), encoder(tok), TEMPLATES[template]
    for segments in (
        render(Sample(format="chat", messages=messages), t, sp).unwrap(),
        render_prompt(messages[:-1], t, sp).unwrap(),
    ):
        ids = tokenize(segments, enc, sp).ids
        if sp.add_bos:
            assert ids[0] == sp.bos_id
        assert not any(a == b == sp.bos_id for a, b in zip(ids, ids[1:], strict=False))


@pytest.mark.parametrize("template", list(TEMPLATES))
@PROPS
@given(messages=conversations(), context=st.one_of(st.just(""), content))
def test_render_never_mutates_its_input(template, messages, context):
    sp, t = specials(TOKENIZERS["bos"]), TEMPLATES[template]
    as_list = list(messages)
    sample = Sample(format="instruction" if context else "chat", messages=messages, input=context)
    before = (copy.deepcopy(sample), copy.deepcopy(as_list), copy.deepcopy(t), copy.deepcopy(sp))
    first = render(sample, t, sp)
    render_prompt(as_list[:-1], t, sp, context)
    assert (sample, as_list, t, sp) == before
    assert render(sample, t, sp) == first  # and it is deterministic
