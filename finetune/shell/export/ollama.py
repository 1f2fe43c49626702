"""An Ollama `Modelfile` beside an exported GGUF: FROM, ADAPTER, TEMPLATE, SYSTEM, PARAMETER stop.

Chat templates are translated only where their shape is known: ChatML (`<|im_start|>`...`<|im_end|>`,
SmolLM2, Qwen2) and Llama 3 (`<|start_header_id|>`...`<|eot_id|>`). Any other template is left
out (Ollama then reads the GGUF's own `tokenizer.chat_template` if it recognises it) with a note.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from msgspec import Struct

from finetune.files.paths import write_text

TEMPLATES = ("chatml", "llama3")  # what `translate` understands

_CHATML = ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
           '<|im_start|>assistant\n')
_LLAMA3 = ('{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>'
           '{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n')


class Translated(Struct, frozen=True):
    kind: str  # chatml, llama3, or "" (not translated)
    template: str  # Ollama's Go template ("" when not translated)
    stops: list[str]
    system: str = ""  # a default system prompt the template writes when none is given


def translate(chat_template: str | None) -> Translated:
    """The Ollama form of a Jinja chat template, where it is ChatML or Llama 3 shaped."""
    text = chat_template or ""
    if "<|im_start|>" in text and "<|im_end|>" in text:
        found = re.search(r"<\|im_start\|>system\\n(.+?)<\|im_end\|>", text) or re.search(r"<\|im_start\|>system\n(.+?)<\|im_end\|>", text)
        return Translated("chatml", _CHATML, ["<|im_start|>", "<|im_end|>"], found.group(1) if found else "")
    if "<|start_header_id|>" in text and "<|eot_id|>" in text:
        return Translated("llama3", _LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    return Translated("", "", [])


def modelfile(model: str, adapter: str, translated: Translated, eos: str) -> str:
    """The Modelfile's text; `model`/`adapter` as written after FROM/ADAPTER."""
    lines = [f"FROM {model}"]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    if translated.template:
        lines.append(f'TEMPLATE """{translated.template}"""')
    if translated.system:
        lines.append(f'SYSTEM """{translated.system}"""')
    stops = list(dict.fromkeys([*translated.stops, *([eos] if eos else [])]))
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"


def relative(path: Path, beside: Path) -> str:
    """`path` as a Modelfile in `beside` names it: ./name when in the same folder, else absolute."""
    if path.resolve().parent == beside.resolve():
        return f"./{path.name}"
    return os.path.abspath(path)


def write(model: Path, adapter: Path | None, chat_template: str | None, eos: str) -> tuple[Path, Translated]:
    """Write `Modelfile` beside the adapter GGUF (or beside the model GGUF when there is none)."""
    folder = (adapter or model).parent
    translated = translate(chat_template)
    text = modelfile(relative(model, folder), relative(adapter, folder) if adapter else "", translated, eos)
    path = folder / "Modelfile"
    write_text(path, text)
    return path, translated
