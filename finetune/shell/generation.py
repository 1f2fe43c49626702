"""Generation above the engines: prompt ids from text or messages, what stops a reply, streamed
UTF-8 text. Each engine decodes (`Engine.generate`); these serve both."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from msgspec import Struct
from returns.result import Result, Success

from finetune.core import templates
from finetune.core.records import Message
from finetune.core.tokenize import Segment, tokenize
from finetune.files.tokenizer import encoder, specials

# End-of-turn markers of common chat templates (ChatML/Qwen, Llama 3, Phi, Gemma).
END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


class TextStream:
    """Token ids in, text out: only complete characters, and nothing past a stop string.

    Byte-level BPE tokens can end inside a UTF-8 character; their decoded text then ends in U+FFFD,
    and is held back until the character completes (the incremental window of HF's TGI).
    Text that could be the start of a stop string is held back until it is decided.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop_strings: Sequence[str] = ()):
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0  # start of the decode window (keeps leading-space context)
        self._read = 0  # tokens up to here have been turned into text
        self._stops = tuple(s for s in stop_strings if s)
        self._held = ""  # complete text that may begin a stop string
        self.stopped = False

    def add(self, token: int) -> str:
        """Newly complete text after `token` ('' while a character or a stop string is pending)."""
        if self.stopped:
            return ""
        self._ids.append(token)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return self._release(self._held + after[len(before) :], final=False)

    def finish(self) -> str:
        """Whatever is left at the end of generation, incomplete bytes included (as U+FFFD)."""
        if self.stopped:
            return ""
        before = self._decode(self._ids[self._prefix : self._read])
        rest = self._decode(self._ids[self._prefix :])[len(before) :]
        self._prefix = self._read = len(self._ids)
        return self._release(self._held + rest, final=True)

    def _release(self, text: str, final: bool) -> str:
        hits = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return text[: min(hits)]
        keep = 0 if final else _partial_stop(text, self._stops)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]


def _partial_stop(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string."""
    longest = max((len(s) for s in stops), default=0)
    for k in range(min(longest - 1, len(text)), 0, -1):
        if any(s.startswith(text[-k:]) for s in stops):
            return k
    return 0


class Prompt(Struct, frozen=True):
    """Prompt token ids and what ends the reply: single-token stops as ids, the rest as text."""

    ids: tuple[int, ...]
    stop_ids: tuple[int, ...]
    stop_strings: tuple[str, ...]


def build_prompt(
    tokenizer: Any,
    *,
    text: str | None = None,
    messages: Sequence[Message] = (),
    template: templates.Template | None = None,
) -> Result[Prompt, str]:
    """Raw `text` as-is (BOS per the tokenizer), or messages rendered with `template` + header.

    Rendering and tokenization are the training path's (segment by segment), so the prompt's ids
    are a prefix of the ids the same conversation with its answer is trained on.
    """
    sp, encode = specials(tokenizer), encoder(tokenizer)
    if template is None:
        assert text is not None, "raw prompts need text"
        segments: Result[tuple[Segment, ...], str] = Success((Segment(text, False),))
        stops = templates.end_of_turn("plain", sp)
    else:
        turns = tuple(messages) or (Message("user", text or ""),)
        segments = templates.render_prompt(turns, template, sp)
        stops = templates.end_of_turn(template, sp)
        if isinstance(template, templates.Jinja):  # a model's own template: its end-of-turn marker
            stops += tuple(m for m in END_MARKERS if m in template.source and m not in stops)

    def finish(segs: tuple[Segment, ...]) -> Prompt:
        ids = tokenize(segs, encode, sp).ids
        single = {s: encode(s) for s in stops}
        stop_ids = tuple(dict.fromkeys(p[0] for p in single.values() if len(p) == 1))
        if sp.eos_id >= 0 and sp.eos_id not in stop_ids:
            stop_ids += (sp.eos_id,)
        return Prompt(ids, stop_ids, tuple(s for s, p in single.items() if len(p) != 1))

    return segments.map(finish)


def decoder(tokenizer: Any) -> Callable[[list[int]], str]:
    """`list[int] -> str` keeping special tokens and spaces exactly as the tokenizer writes them."""

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    return decode
