"""Chat templates as pure renderers: a Sample -> text segments marked trained or masked.

Built-ins are Python functions; `tokenizer` and custom templates are Jinja sources rendered
incrementally, so each assistant turn's span is located exactly in the full text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache

from msgspec import Struct
from returns.result import Failure, Result, Success

from finetune.core.records import Message, Sample
from finetune.core.tokenize import Segment, Specials

BUILTIN = ("plain", "alpaca", "chatml", "llama2", "llama3")
Supervise = str  # "assistant" | "last-turn-only" | "all"

_ALPACA = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
_ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
)


class Jinja(Struct, frozen=True):
    """A chat template in HF's Jinja dialect (the model's own, or the user's)."""

    source: str


Template = str | Jinja  # a built-in name, or Jinja source
Turn = tuple[str, bool]  # (text, is assistant content)
Renderer = Callable[[Sequence[Message], str, Specials, bool], list[Turn]]


def end_of_turn(template: Template, specials: Specials) -> tuple[str, ...]:
    """Strings that end an assistant turn (generation stops at any of them or EOS)."""
    extra = {"chatml": ("<|im_end|>",), "llama3": ("<|eot_id|>",)}
    stops = (specials.eos,) if specials.eos else ()
    return stops + extra.get(template, ()) if isinstance(template, str) else stops


def render(
    sample: Sample, template: Template, specials: Specials, supervise: Supervise = "assistant"
) -> Result[tuple[Segment, ...], str]:
    """The sample as segments; assistant content (+ its end-of-turn) is trained per `supervise`."""
    if sample.format == "text":
        return Success((Segment(sample.text, True), Segment(specials.eos, True)))
    turns = _turns(sample, template, specials, generation=False)
    return turns.map(lambda t: _segments(t, supervise))


def render_prompt(
    messages: Sequence[Message], template: Template, specials: Specials, context: str = ""
) -> Result[tuple[Segment, ...], str]:
    """Segments of a conversation followed by the assistant's header, ready for generation."""
    sample = Sample(format="chat", messages=tuple(messages), input=context)
    return _turns(sample, template, specials, generation=True).map(
        lambda t: _segments(t, "assistant")
    )


def _segments(turns: list[Turn], supervise: Supervise) -> tuple[Segment, ...]:
    # Consecutive assistant pieces (content, then EOS) form one turn; number the turns.
    ids, n = [], -1
    for i, (_, a) in enumerate(turns):
        if a and not (i and turns[i - 1][1]):
            n += 1
        ids.append(n if a else -1)
    train = {
        "assistant": lambda k: k >= 0,
        "last-turn-only": lambda k: k >= 0 and k == n,
        "all": lambda k: True,
    }[supervise]
    return tuple(Segment(t, train(k)) for (t, _), k in zip(turns, ids, strict=True) if t)


def _turns(
    sample: Sample, template: Template, specials: Specials, generation: bool
) -> Result[list[Turn], str]:
    if isinstance(template, Jinja):
        return _jinja_turns(_merged(sample), template.source, specials, generation)
    if template == "alpaca":
        return Success(_alpaca(sample, specials, generation))
    if template in _RENDERERS:
        return Success(_RENDERERS[template](_merged(sample), specials, generation))
    return Failure(f"unknown template {template!r}; expected one of {', '.join(BUILTIN)}")


def _merged(sample: Sample) -> tuple[Message, ...]:
    """Fold Alpaca's `input` into the first user message for templates without an Input slot."""
    if not sample.input:
        return sample.messages
    out, done = [], False
    for m in sample.messages:
        if m.role == "user" and not done:
            m, done = Message("user", f"{m.content}\n\n{sample.input}"), True
        out.append(m)
    return tuple(out)


def _plain(messages: Sequence[Message], sp: Specials, gen: bool) -> list[Turn]:
    turns: list[Turn] = []
    for m in messages:
        if m.role == "assistant":
            turns += [(m.content, True), (sp.eos, True)]
        elif m.role == "system":
            turns.append((m.content + "\n\n", False))
        else:
            sep = "" if m.content[-1:].isspace() else "\n"
            turns.append((m.content + sep, False))
    return turns


def _alpaca(sample: Sample, sp: Specials, gen: bool) -> list[Turn]:
    messages = sample.messages
    has_system = bool(messages) and messages[0].role == "system"
    head = messages[0].content + "\n\n" if has_system else (_ALPACA_INPUT if sample.input else _ALPACA)
    turns: list[Turn] = [(head, False)]
    first_user = True
    for m in messages[1:] if has_system else messages:
        if m.role == "user":
            text = f"### Instruction:\n{m.content}\n\n"
            if sample.input and first_user:
                text += f"### Input:\n{sample.input}\n\n"
            turns.append((text + "### Response:\n", False))
            first_user = False
        else:
            turns += [(m.content, True), (sp.eos, True), ("\n\n", False)]
    return _strip_tail(turns, gen)


def _chatml(messages: Sequence[Message], sp: Specials, gen: bool) -> list[Turn]:
    turns: list[Turn] = []
    for m in messages:
        if m.role == "assistant":
            turns += [("<|im_start|>assistant\n", False), (m.content + "<|im_end|>", True), ("\n", False)]
        else:
            turns.append((f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n", False))
    if gen:
        turns.append(("<|im_start|>assistant\n", False))
    return turns


def _llama2(messages: Sequence[Message], sp: Specials, gen: bool) -> list[Turn]:
    system = messages[0].content if messages and messages[0].role == "system" else ""
    turns: list[Turn] = []
    for m in messages[1:] if system else messages:
        if m.role == "user":
            body = f"<<SYS>>\n{system}\n<</SYS>>\n\n{m.content}" if system else m.content
            turns.append((f"{sp.bos}[INST] {body.strip()} [/INST]", False))
            system = ""
        else:
            turns += [(f" {m.content.strip()} ", True), (sp.eos, True)]
    return turns


def _llama3(messages: Sequence[Message], sp: Specials, gen: bool) -> list[Turn]:
    bos = sp.bos or "<|begin_of_text|>"
    turns: list[Turn] = [(bos, False)]
    for m in messages:
        header = f"<|start_header_id|>{m.role}<|end_header_id|>\n\n"
        if m.role == "assistant":
            turns += [(header, False), (m.content.strip() + "<|eot_id|>", True)]
        else:
            turns.append((f"{header}{m.content.strip()}<|eot_id|>", False))
    if gen:
        turns.append(("<|start_header_id|>assistant<|end_header_id|>\n\n", False))
    return turns


def _strip_tail(turns: list[Turn], gen: bool) -> list[Turn]:
    """Drop a trailing masked separator after the final assistant turn."""
    if turns and turns[-1] == ("\n\n", False):
        return turns[:-1]
    return turns


_RENDERERS: dict[str, Renderer] = {"plain": _plain, "chatml": _chatml, "llama2": _llama2, "llama3": _llama3}


def _jinja_turns(
    messages: Sequence[Message], source: str, sp: Specials, gen: bool
) -> Result[list[Turn], str]:
    """Locate each assistant turn by rendering the conversation up to it and up to after it."""
    try:
        template = _compile(source)
        as_dicts = [{"role": m.role, "content": m.content} for m in messages]

        def text(upto: int, prompt: bool) -> str:
            return template.render(
                messages=as_dicts[:upto], add_generation_prompt=prompt,
                bos_token=sp.bos, eos_token=sp.eos,
            )

        full = text(len(as_dicts), gen)
        turns: list[Turn] = []
        pos = 0
        for i, m in enumerate(messages):
            if m.role != "assistant":
                continue
            head, body = text(i, True), text(i + 1, False)
            start, end = len(head), len(body)
            if not (full.startswith(head) and full.startswith(body) and pos <= start <= end):
                return Failure(
                    f"the chat template does not render turn {i} as a prefix of the conversation; "
                    "pick a built-in template with --template"
                )
            span = full[start:end]
            kept = span.rstrip("\n")
            turns += [(full[pos:start], False), (kept, True)]
            pos = start + len(kept)
        turns.append((full[pos:], False))
        return Success(turns)
    except Exception as err:  # jinja2 syntax/undefined errors and raise_exception() from the template
        return Failure(f"chat template failed: {err}")


@lru_cache(maxsize=16)
def _compile(source: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda x, **_: __import__("json").dumps(x, ensure_ascii=False)
    return env.from_string(source)


def choose(name: str, fmt: str, chat_template: str = "", file_text: str = "") -> Result[Template, str]:
    """Pick the template for rows of `fmt`: a built-in, the model's own, or custom Jinja.

    `auto` chooses by format: chat rows use the model's template (else chatml), prompt/completion
    rows `plain`, instruction rows `alpaca`. `file_text` is the content when `name` is a file.
    """
    if file_text:
        return Success(Jinja(file_text))
    if name == "auto":
        if fmt == "chat":
            return Success(Jinja(chat_template) if chat_template else "chatml")
        return Success({"instruction": "alpaca"}.get(fmt, "plain"))
    if name == "tokenizer":
        if not chat_template:
            return Failure(
                "the model's tokenizer has no chat template; pick one of "
                f"{', '.join(BUILTIN)} with --template"
            )
        return Success(Jinja(chat_template))
    if name in BUILTIN:
        return Success(name)
    if "{{" in name or "{%" in name:
        return Success(Jinja(name))
    return Failure(
        f"unknown template {name!r}: expected auto, tokenizer, {', '.join(BUILTIN)}, "
        "a Jinja template string, or a file holding one"
    )
