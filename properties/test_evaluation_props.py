"""Evaluation invariants: a row's prompt is exactly the prefix training sees (every template, both
tokenizers, text rows split at a marker), and whitespace collapsing is idempotent."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_template_props import TEMPLATES, TOKENIZERS, content, conversations

from finetune.core import evaluation
from finetune.core.records import Message, Sample
from finetune.core.templates import render_prompt
from finetune.core.tokenize import tokenize
from finetune.files.tokenizer import encoder, specials
from finetune.shell.generation import decoder

CASES = [(t, k) for t in TEMPLATES for k in TOKENIZERS]
PROPS = settings(deadline=None, max_examples=20)


def _case(tok, sample, template, **kw):
    return evaluation.case(1, sample, template, specials(tok), encoder(tok), decoder(tok), **kw)


@pytest.mark.parametrize(("template", "tok_name"), CASES)
@PROPS
@given(messages=conversations(), context=st.one_of(st.just(""), content), tail=st.booleans())
def test_prompt_is_the_training_prefix_up_to_the_last_answer(template, tok_name, messages, context, tail):
    """The prompt is the generation prompt of the turns before the last assistant turn, and its
    ids are the first ids of the whole row; the reference is that turn's content. A trailing user
    turn (`tail`) changes neither."""
    tok = TOKENIZERS[tok_name]
    t, sp, enc = TEMPLATES[template], specials(tok), encoder(tok)
    last = len(messages) - 1
    rows = messages + ((Message("user", "more?"),) if tail else ())
    sample = Sample(format="instruction" if context else "chat", messages=rows, input=context)
    case = _case(tok, sample, t).unwrap()
    assert case.tokens.ids[: len(case.prompt)] == case.prompt
    assert case.prompt == tokenize(render_prompt(messages[:last], t, sp, context).unwrap(), enc, sp).ids
    assert case.reference == messages[last].content
    assert case.tokens.mask[len(case.prompt)] == 1  # the answer's first token is trained


words = st.text(st.sampled_from(list("abcxyz SELECT FROM,=?019\n")), min_size=1, max_size=24)


@pytest.mark.parametrize("tok_name", list(TOKENIZERS))
@PROPS
@given(question=words, answer=words.filter(lambda s: s.strip()), marker=st.sampled_from(["A: ", "A:", "=>", "\n"]))
def test_text_prompt_is_a_token_prefix_and_the_rest_is_the_reference(tok_name, question, answer, marker):
    """Text rows: the prompt is a prefix of the row's own tokens that ends at or before the
    marker's end (tokens are never split), and prompt text + reference is the whole text."""
    tok = TOKENIZERS[tok_name]
    text = question.replace(marker, "") + marker + answer
    case = _case(tok, Sample(format="text", text=text), "plain", answer_after=marker).unwrap()
    assert case.tokens.ids[: len(case.prompt)] == case.prompt
    sp = specials(tok)
    said = tok.decode([i for i in case.prompt if i != sp.bos_id], skip_special_tokens=False)
    assert said + case.reference == text
    assert len(said) <= text.index(marker) + len(marker)


@given(messages=conversations())
@PROPS
def test_a_chat_without_an_answer_is_refused_as_empty(messages):
    tok = TOKENIZERS["bos"]
    without = tuple(m for m in messages if m.role != "assistant")
    error = _case(tok, Sample(format="chat", messages=without), "chatml").failure()
    assert error.kind == "empty"


spaced = st.text(st.sampled_from(list("ab c\t\n\r é日")), max_size=30)


@given(text=spaced)
def test_collapse_is_idempotent_and_keeps_the_words(text):
    once = evaluation.collapse(text)
    assert evaluation.collapse(once) == once
    assert once.split(" ") == text.split() or (once == "" and not text.split())
    assert once == once.strip() and "  " not in once


@given(text=spaced, pad=st.sampled_from(["", " ", "\n", "\t  "]))
def test_exact_match_ignores_whitespace_layout_and_implies_contains(text, pad):
    outcome = evaluation.judge(1, pad + text.replace(" ", "  ") + pad, text, 0)
    assert outcome.exact and outcome.contains
    assert evaluation.judge(1, text + " x", text, 0).contains
