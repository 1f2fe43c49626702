"""Templates on a real BPE tokenizer: exactly which text carries loss, BOS handling, resolution."""

from __future__ import annotations

import pytest
from returns.result import Failure, Success

from finetune.core.config import DataConfig, Recipe
from finetune.core.prepare import encode_samples
from finetune.core.records import Message, Sample
from finetune.core.templates import Jinja, choose, end_of_turn, render, render_prompt
from finetune.core.tokenize import Specials, Tokens, tokenize, truncate
from finetune.files.tokenizer import CHATML_TEMPLATE, encoder, specials
from finetune.shell.data.check import template_for

SYSTEM, USER1, BOT1, USER2, BOT2 = "Be brief.", "hello", "world", "how are you?", "fine"
CHAT = Sample(
    format="chat",
    messages=(
        Message("system", SYSTEM),
        Message("user", USER1),
        Message("assistant", BOT1),
        Message("user", USER2),
        Message("assistant", BOT2),
    ),
)
COMPLETION = Sample(
    format="completions", messages=(Message("user", "Q: 2+2?\nA: "), Message("assistant", "4"))
)
INSTRUCTION = Sample(
    format="instruction",
    messages=(Message("user", "Translate."), Message("assistant", "hello")),
    input="bonjour",
)
TEXT = Sample(format="text", text="SELECT name FROM users")

# A custom template string using bos_token/eos_token, and a Zephyr-like one kept in a file.
CUSTOM = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
ZEPHYR = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# The whole conversation CHAT as each template renders it (decoded, after the tokenizer's BOS).
FULL = {
    "plain": f"<s>{SYSTEM}\n\n{USER1}\n{BOT1}</s>{USER2}\n{BOT2}</s>",
    "alpaca": (
        f"<s>{SYSTEM}\n\n### Instruction:\n{USER1}\n\n### Response:\n{BOT1}</s>\n\n"
        f"### Instruction:\n{USER2}\n\n### Response:\n{BOT2}</s>"
    ),
    "chatml": (
        f"<s><|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{USER1}<|im_end|>\n"
        f"<|im_start|>assistant\n{BOT1}<|im_end|>\n<|im_start|>user\n{USER2}<|im_end|>\n"
        f"<|im_start|>assistant\n{BOT2}<|im_end|>\n"
    ),
    "llama2": (
        f"<s>[INST] <<SYS>>\n{SYSTEM}\n<</SYS>>\n\n{USER1} [/INST] {BOT1} </s>"
        f"<s>[INST] {USER2} [/INST] {BOT2} </s>"
    ),
    "llama3": (
        f"<s><|start_header_id|>system<|end_header_id|>\n\n{SYSTEM}<|eot_id|>"
        f"<|start_header_id|>user<|end_header_id|>\n\n{USER1}<|eot_id|>"
        f"<|start_header_id|>assistant<|end_header_id|>\n\n{BOT1}<|eot_id|>"
        f"<|start_header_id|>user<|end_header_id|>\n\n{USER2}<|eot_id|>"
        f"<|start_header_id|>assistant<|end_header_id|>\n\n{BOT2}<|eot_id|>"
    ),
    "tokenizer": (
        f"<s><|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{USER1}<|im_end|>\n"
        f"<|im_start|>assistant\n{BOT1}<|im_end|>\n<|im_start|>user\n{USER2}<|im_end|>\n"
        f"<|im_start|>assistant\n{BOT2}<|im_end|>\n"
    ),
    "custom": f"<s>system: {SYSTEM}\nuser: {USER1}\nassistant: {BOT1}</s>\nuser: {USER2}\nassistant: {BOT2}</s>\n",
    "file": (
        f"<s><|system|>\n{SYSTEM}\n<|user|>\n{USER1}\n<|assistant|>\n{BOT1}</s>\n"
        f"<|user|>\n{USER2}\n<|assistant|>\n{BOT2}</s>\n"
    ),
}
# What carries loss in CHAT, turn by turn: the assistant's text and its end-of-turn marker.
TURNS = {
    "plain": (f"{BOT1}</s>", f"{BOT2}</s>"),
    "alpaca": (f"{BOT1}</s>", f"{BOT2}</s>"),
    "chatml": (f"{BOT1}<|im_end|>", f"{BOT2}<|im_end|>"),
    "llama2": (f" {BOT1} </s>", f" {BOT2} </s>"),
    "llama3": (f"{BOT1}<|eot_id|>", f"{BOT2}<|eot_id|>"),
    "tokenizer": (f"{BOT1}<|im_end|>", f"{BOT2}<|im_end|>"),
    "custom": (f"{BOT1}</s>", f"{BOT2}</s>"),
    "file": (f"{BOT1}</s>", f"{BOT2}</s>"),
}
ALL = tuple(FULL)
BUILTINS = ("plain", "alpaca", "chatml", "llama2", "llama3")
# The token that ends an assistant turn and must be supervised (llama3's <|eot_id|> is plain text
# to this tokenizer, so its end is checked through the decoded text only).
END_TOKEN = {"chatml": "<|im_end|>", "tokenizer": "<|im_end|>", "llama3": None}


@pytest.fixture(scope="module")
def template_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("templates") / "zephyr.jinja"
    path.write_text(ZEPHYR, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def templates(tokenizer, template_file):
    """Name -> resolved template, the file one through the shell as a recipe would give it."""
    recipe = Recipe(data=DataConfig(template=str(template_file)))
    out = {name: name for name in BUILTINS}
    out["tokenizer"] = choose("tokenizer", "chat", tokenizer.chat_template).unwrap()
    out["custom"] = choose(CUSTOM, "chat").unwrap()
    out["file"] = template_for(recipe, "chat", tokenizer.chat_template).unwrap()
    return out


def encode(tok, sample, template, supervise="assistant") -> Tokens:
    segments = render(sample, template, specials(tok), supervise).unwrap()
    return tokenize(segments, encoder(tok), specials(tok))


def text(tok, ids) -> str:
    return tok.decode(list(ids), skip_special_tokens=False)


def trained(tok, tokens: Tokens) -> str:
    return text(tok, [i for i, m in zip(tokens.ids, tokens.mask, strict=True) if m])


def masked(tok, tokens: Tokens) -> str:
    return text(tok, [i for i, m in zip(tokens.ids, tokens.mask, strict=True) if not m])


# --- what is trained ---------------------------------------------------------------------------


def test_resolved_templates(templates, tokenizer):
    assert templates["tokenizer"] == Jinja(CHATML_TEMPLATE) == Jinja(tokenizer.chat_template)
    assert templates["custom"] == Jinja(CUSTOM)
    assert templates["file"] == Jinja(ZEPHYR)


@pytest.mark.parametrize("name", ALL)
def test_full_text(tokenizer, templates, name):
    tokens = encode(tokenizer, CHAT, templates[name])
    assert text(tokenizer, tokens.ids) == FULL[name]


@pytest.mark.parametrize("name", ALL)
def test_only_assistant_turns_and_their_end_are_trained(tokenizer, templates, name):
    tokens = encode(tokenizer, CHAT, templates[name])
    assert trained(tokenizer, tokens) == "".join(TURNS[name])
    rest = masked(tokenizer, tokens)
    assert SYSTEM in rest and USER1 in rest and USER2 in rest
    assert BOT1 not in rest and BOT2 not in rest


@pytest.mark.parametrize("name", ALL)
def test_end_of_turn_token_is_supervised(tokenizer, templates, name):
    tokens = encode(tokenizer, CHAT, templates[name])
    end = END_TOKEN.get(name, "</s>")
    if end is None:
        assert trained(tokenizer, tokens).endswith("<|eot_id|>")
        return
    end_id = tokenizer.convert_tokens_to_ids(end)
    supervised = [tokens.mask[t] for t, i in enumerate(tokens.ids) if i == end_id]
    assert supervised.count(1) == 2  # one per assistant turn; chatml's system/user ends stay masked
    assert supervised.count(0) == (3 if end == "<|im_end|>" else 0)
    last = max(t for t, m in enumerate(tokens.mask) if m)
    assert tokens.ids[last] == end_id


@pytest.mark.parametrize("name", ALL)
def test_last_turn_only(tokenizer, templates, name):
    tokens = encode(tokenizer, CHAT, templates[name], "last-turn-only")
    assert trained(tokenizer, tokens) == TURNS[name][-1]
    assert text(tokenizer, tokens.ids) == FULL[name]


@pytest.mark.parametrize("name", ALL)
def test_all_trains_everything_but_the_first_token(tokenizer, templates, name):
    tokens = encode(tokenizer, CHAT, templates[name], "all")
    assert tokens.mask == (0,) + (1,) * (len(tokens.ids) - 1)
    assert text(tokenizer, tokens.ids) == FULL[name]


@pytest.mark.parametrize("name", ALL)
def test_mask_is_binary_and_never_trains_the_first_token(tokenizer, templates, name):
    tokens = encode(tokenizer, CHAT, templates[name])
    assert len(tokens.ids) == len(tokens.mask)
    assert tokens.mask[0] == 0
    assert set(tokens.mask) == {0, 1}


def test_tokenizer_template_matches_transformers(tokenizer, templates):
    messages = [{"role": m.role, "content": m.content} for m in CHAT.messages]
    expected = tokenizer.apply_chat_template(messages, tokenize=False)
    tokens = encode(tokenizer, CHAT, templates["tokenizer"])
    assert text(tokenizer, tokens.ids) == "<s>" + expected


def test_completion_with_plain(tokenizer):
    tokens = encode(tokenizer, COMPLETION, "plain")
    assert text(tokenizer, tokens.ids) == "<s>Q: 2+2?\nA: 4</s>"
    assert trained(tokenizer, tokens) == "4</s>"
    assert tokens.mask[-1] == 1 and tokens.ids[-1] == tokenizer.eos_token_id


def test_plain_separates_a_prompt_without_trailing_space(tokenizer):
    sample = Sample(
        format="completions", messages=(Message("user", "SELECT"), Message("assistant", "1"))
    )
    tokens = encode(tokenizer, sample, "plain")
    assert text(tokenizer, tokens.ids) == "<s>SELECT\n1</s>"
    assert trained(tokenizer, tokens) == "1</s>"


def test_alpaca_with_input_renders_the_input_section(tokenizer):
    tokens = encode(tokenizer, INSTRUCTION, "alpaca")
    assert text(tokenizer, tokens.ids) == (
        "<s>Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nTranslate.\n\n### Input:\nbonjour\n\n### Response:\nhello</s>"
    )
    assert trained(tokenizer, tokens) == "hello</s>"


def test_alpaca_without_input(tokenizer):
    sample = Sample(format="instruction", messages=INSTRUCTION.messages)
    tokens = encode(tokenizer, sample, "alpaca")
    assert text(tokenizer, tokens.ids) == (
        "<s>Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nTranslate.\n\n### Response:\nhello</s>"
    )
    assert "### Input:" not in text(tokenizer, tokens.ids)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "chatml",
            "<s><|im_start|>user\nTranslate.\n\nbonjour<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n",
        ),
        ("plain", "<s>Translate.\n\nbonjour\nhello</s>"),
    ],
)
def test_input_is_folded_into_the_prompt_for_other_templates(tokenizer, name, expected):
    tokens = encode(tokenizer, INSTRUCTION, name)
    assert text(tokenizer, tokens.ids) == expected
    assert trained(tokenizer, tokens) == TURNS[name][0].replace(BOT1, "hello")


def test_text_rows_train_everything_after_bos(tokenizer, plain_tokenizer):
    tokens = encode(tokenizer, TEXT, "plain")
    assert tokens.ids[0] == tokenizer.bos_token_id and tokens.mask[0] == 0
    assert trained(tokenizer, tokens) == TEXT.text + "</s>"
    no_bos = encode(plain_tokenizer, TEXT, "plain")
    assert no_bos.ids[0] != plain_tokenizer.bos_token_id
    assert no_bos.mask[0] == 0 and all(no_bos.mask[1:])
    assert text(plain_tokenizer, no_bos.ids) == TEXT.text + "</s>"


# --- BOS -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_exactly_one_bos_at_the_start(tokenizer, templates, name):
    """llama2/llama3 and the custom template render BOS text; the tokenizer adds BOS too: one wins."""
    tokens = encode(tokenizer, CHAT, templates[name])
    bos = tokenizer.bos_token_id
    assert tokens.ids[0] == bos
    assert tokens.ids[1] != bos
    assert tokens.mask[0] == 0
    # llama2 opens every [INST] with BOS; everything else has BOS only at the start
    assert tokens.ids.count(bos) == (2 if name == "llama2" else 1)


@pytest.mark.parametrize("name", ["plain", "alpaca", "chatml"])
def test_tokenizer_without_bos_gets_none(plain_tokenizer, name):
    tokens = encode(plain_tokenizer, CHAT, name)
    assert plain_tokenizer.bos_token_id not in tokens.ids
    assert text(plain_tokenizer, tokens.ids) == FULL[name].removeprefix("<s>")
    assert trained(plain_tokenizer, tokens) == "".join(TURNS[name])


def test_custom_jinja_without_bos_on_tokenizer_without_bos(plain_tokenizer, templates):
    tokens = encode(plain_tokenizer, CHAT, templates["file"])
    assert plain_tokenizer.bos_token_id not in tokens.ids
    assert text(plain_tokenizer, tokens.ids) == FULL["file"].removeprefix("<s>")


@pytest.mark.parametrize("name", ["llama2", "llama3"])
def test_templates_that_render_bos_keep_exactly_one(plain_tokenizer, name):
    tokens = encode(plain_tokenizer, CHAT, name)
    assert tokens.ids[0] == plain_tokenizer.bos_token_id != tokens.ids[1]
    assert text(plain_tokenizer, tokens.ids) == FULL[name]


def test_specials_of_both_tokenizers(tokenizer, plain_tokenizer):
    sp = specials(tokenizer)
    assert (sp.bos, sp.eos, sp.add_bos) == ("<s>", "</s>", True)
    assert sp.bos_id == tokenizer.bos_token_id and sp.eos_id == tokenizer.eos_token_id
    assert specials(plain_tokenizer).add_bos is False
    assert plain_tokenizer.chat_template is None


# --- prompts for generation ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_prompt_is_a_prefix_of_the_conversation(tokenizer, templates, name):
    sp, enc = specials(tokenizer), encoder(tokenizer)
    full = encode(tokenizer, CHAT, templates[name])
    for k in (2, 4):  # the two assistant turns
        prompt = tokenize(render_prompt(CHAT.messages[:k], templates[name], sp).unwrap(), enc, sp)
        assert full.ids[: len(prompt.ids)] == prompt.ids
        assert full.mask[: len(prompt.ids)] == prompt.mask
        assert trained(tokenizer, prompt) == "".join(TURNS[name][: k // 2 - 1])
        rest = Tokens(full.ids[len(prompt.ids) :], full.mask[len(prompt.ids) :])
        assert text(tokenizer, rest.ids).startswith(TURNS[name][k // 2 - 1])


def test_chatml_prompt_ends_with_the_assistant_header(tokenizer):
    sp = specials(tokenizer)
    prompt = tokenize(
        render_prompt(CHAT.messages[:2], "chatml", sp).unwrap(), encoder(tokenizer), sp
    )
    assert text(tokenizer, prompt.ids) == (
        f"<s><|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{USER1}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_end_of_turn_strings():
    sp = Specials(eos="</s>")
    assert end_of_turn("chatml", sp) == ("</s>", "<|im_end|>")
    assert end_of_turn("llama3", sp) == ("</s>", "<|eot_id|>")
    assert end_of_turn("plain", sp) == ("</s>",)
    assert end_of_turn(Jinja(CUSTOM), sp) == ("</s>",)
    assert end_of_turn("chatml", Specials()) == ("<|im_end|>",)


# --- resolve ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "chat_template", "expected"),
    [
        ("chat", CHATML_TEMPLATE, Jinja(CHATML_TEMPLATE)),
        ("chat", "", "chatml"),
        ("completions", CHATML_TEMPLATE, "plain"),
        ("instruction", CHATML_TEMPLATE, "alpaca"),
        ("instruction", "", "alpaca"),
        ("text", CHATML_TEMPLATE, "plain"),
    ],
)
def test_auto_picks_by_format(fmt, chat_template, expected):
    assert choose("auto", fmt, chat_template) == Success(expected)


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_names_resolve_to_themselves(name):
    assert choose(name, "chat", CHATML_TEMPLATE) == Success(name)


def test_tokenizer_template_needs_a_chat_template():
    result = choose("tokenizer", "chat", "")
    assert isinstance(result, Failure)
    assert "no chat template" in result.failure()
    assert "--template" in result.failure()
    assert choose("tokenizer", "chat", CHATML_TEMPLATE) == Success(Jinja(CHATML_TEMPLATE))


def test_unknown_template_name():
    result = choose("vicuna", "chat", CHATML_TEMPLATE)
    assert isinstance(result, Failure)
    assert "unknown template 'vicuna'" in result.failure()
    rendered = render(CHAT, "vicuna", Specials())
    assert isinstance(rendered, Failure) and "vicuna" in rendered.failure()


def test_jinja_strings_and_file_text():
    assert choose("{{ messages[0]['content'] }}", "chat") == Success(
        Jinja("{{ messages[0]['content'] }}")
    )
    assert choose("{% for m in messages %}{% endfor %}", "completions") == Success(
        Jinja("{% for m in messages %}{% endfor %}")
    )
    assert choose("anything.jinja", "chat", "", file_text=ZEPHYR) == Success(Jinja(ZEPHYR))


def test_template_for_reads_files_and_reports_missing_ones(tmp_path, template_file):
    recipe = Recipe(data=DataConfig(template=str(template_file)))
    assert template_for(recipe, "chat", "") == Success(Jinja(ZEPHYR))
    assert template_for(recipe, "completions", "") == Success(Jinja(ZEPHYR))
    assert template_for(recipe, "text", "") == Success("plain")
    missing = Recipe(data=DataConfig(template=str(tmp_path / "nope.jinja")))
    result = template_for(missing, "chat", "")
    assert isinstance(result, Failure)
    assert "nope.jinja" in result.failure() and "not found" in result.failure()


def test_jinja_errors_are_failures_not_exceptions(tokenizer):
    sp = specials(tokenizer)
    raising = Jinja("{{ raise_exception('roles must alternate') }}")
    result = render(CHAT, raising, sp)
    assert isinstance(result, Failure) and "roles must alternate" in result.failure()
    broken = Jinja("{% for m in messages %}")
    assert isinstance(render(CHAT, broken, sp), Failure)
    # a template whose earlier text depends on later turns cannot be split into prompt and answer
    counting = Jinja("{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    result = render(CHAT, counting, sp)
    assert isinstance(result, Failure) and "prefix" in result.failure()


# --- truncation ---------------------------------------------------------------------------------


def test_truncation_keeps_the_first_tokens(tokenizer):
    tokens = encode(tokenizer, CHAT, "chatml")
    cut = truncate(tokens, 8)
    assert cut.ids == tokens.ids[:8] and cut.mask == tokens.mask[:8]
    assert truncate(tokens, len(tokens.ids)) == tokens
    assert truncate(tokens, 10_000) == tokens


def test_encode_samples_truncates_and_keeps_the_length_before(tokenizer):
    sp, enc = specials(tokenizer), encoder(tokenizer)
    full = encode(tokenizer, CHAT, "chatml")
    encoded, errors = encode_samples(
        [(7, CHAT), (9, TEXT)],
        {"chat": "chatml", "text": "plain"},
        sp,
        enc,
        "assistant",
        8,
    )
    assert errors == []
    assert [(e.line, e.format) for e in encoded] == [(7, "chat"), (9, "text")]
    assert encoded[0].length == len(full.ids) > 8
    assert encoded[0].tokens == Tokens(full.ids[:8], full.mask[:8])
    assert encoded[0].tokens.supervised == 0  # the assistant turns were cut off
    assert len(encoded[1].tokens.ids) == min(8, encoded[1].length)


def test_encode_samples_reports_template_failures_by_line(tokenizer):
    sp, enc = specials(tokenizer), encoder(tokenizer)
    encoded, errors = encode_samples(
        [(3, CHAT)],
        {"chat": Jinja("{{ raise_exception('no') }}")},
        sp,
        enc,
        "assistant",
        64,
    )
    assert encoded == []
    assert [(e.line, e.kind) for e in errors] == [(3, "template")]
