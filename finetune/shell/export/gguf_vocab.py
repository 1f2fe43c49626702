"""A model directory's tokenizer as llama.cpp's `tokenizer.ggml.*` metadata (plus chat template).

tokenizer.json BPE models: byte-level ones (GPT-2, Llama 3, Qwen2, SmolLM) as `gpt2`, byte-fallback
ones (Llama 2, Mistral) as `llama`; a SentencePiece `tokenizer.model` alone through gguf's own
`SentencePieceVocab`. Special ids, add-BOS/EOS, merges and the chat template come from gguf's
`SpecialVocab`, which reads the same files convert_hf_to_gguf.py reads.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from returns.result import Failure, Result, Success

# tokenizer.json pre-tokenizer regexes llama.cpp knows by a `tokenizer.ggml.pre` name
_LLAMA3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_PRE_BY_REGEX = {_LLAMA3: "llama-bpe", _QWEN2: "qwen2"}


def metadata(directory: Path, n_vocab: int) -> Result[tuple[dict[str, Any], str], str]:
    """(`tokenizer.*` keys -> values, a note: "" or why the pre-tokenizer is a guess)."""
    import logging

    import gguf

    logging.getLogger("gguf").setLevel(logging.ERROR)  # its converter-oriented warnings are not ours to print
    tokenizer_json, spm = directory / "tokenizer.json", directory / "tokenizer.model"
    if tokenizer_json.is_file():
        try:
            found = json.loads(tokenizer_json.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            return Failure(f"{tokenizer_json}: not valid JSON ({err})")
        match _from_tokenizer_json(found, n_vocab, tokenizer_json):
            case Success((keys, note)):
                pass
            case failure:
                return failure
    elif spm.is_file():
        vocab = gguf.SentencePieceVocab(directory)
        tokens = list(vocab.all_tokens())
        keys = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
                "tokenizer.ggml.tokens": [t.decode("utf-8") for t, _, _ in tokens],
                "tokenizer.ggml.scores": [float(s) for _, s, _ in tokens],
                "tokenizer.ggml.token_type": [int(k) for _, _, k in tokens]}
        keys = _pad(keys, n_vocab)
        note = ""
    else:
        return Failure(f"{directory}: no tokenizer.json or tokenizer.model to write into the GGUF file")
    special = gguf.SpecialVocab(directory, load_merges=keys["tokenizer.ggml.model"] == "gpt2", n_vocab=n_vocab)
    if special.merges:
        keys["tokenizer.ggml.merges"] = list(special.merges)
    names = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "sep": "seperator_token_id",
             "pad": "padding_token_id", "cls": "cls_token_id", "mask": "mask_token_id", "eot": "eot_token_id"}
    for kind, token in special.special_token_ids.items():
        if kind in names:
            keys[f"tokenizer.ggml.{names[kind]}"] = int(token)
    for kind, add in special.add_special_token.items():
        if kind in ("bos", "eos", "sep"):
            keys[f"tokenizer.ggml.add_{kind}_token"] = bool(add)
    keys.setdefault("tokenizer.ggml.add_bos_token", False)
    if isinstance(special.chat_template, str):
        keys["tokenizer.chat_template"] = special.chat_template
    return Success((keys, note))


def _from_tokenizer_json(found: dict, n_vocab: int, path: Path) -> Result[tuple[dict[str, Any], str], str]:
    model = found.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        return Failure(f"{path}: a {model.get('type')} tokenizer; GGUF export writes BPE tokenizers (byte-level or byte-fallback)")
    byte_fallback = bool(model.get("byte_fallback"))
    by_id = {int(i): t for t, i in model["vocab"].items()}
    added = {int(a["id"]): a for a in found.get("added_tokens") or []}
    by_id.update({i: a["content"] for i, a in added.items()})
    tokens, types, scores = [], [], []
    for i in range(max(n_vocab, max(by_id, default=-1) + 1)):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(5)  # UNUSED
        else:
            tokens.append(text)
            types.append(_token_type(text, added.get(i), byte_fallback))
        scores.append(-float(i))  # merge priority by id, as SentencePiece-style scores
    keys: dict[str, Any] = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types}
    if byte_fallback:
        keys |= {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default", "tokenizer.ggml.scores": scores}
        return Success((keys, ""))
    pre, note = _pre(found.get("pre_tokenizer"))
    keys |= {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre}
    return Success((keys, note))


def _token_type(text: str, added: dict | None, byte_fallback: bool) -> int:
    """llama.cpp's token types: 1 normal, 3 control, 4 user-defined, 6 byte."""
    if added is not None:
        return 3 if added.get("special") else 4
    if byte_fallback and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
        return 6
    return 1


def _pre(pre: dict | None) -> tuple[str, str]:
    """llama.cpp's pre-tokenizer name for tokenizer.json's `pre_tokenizer`, and a note if guessed."""
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2", ""
    regexes = [((s.get("pattern") or {}).get("Regex")) for s in steps if s.get("type") == "Split"]
    for regex in regexes:
        if regex in _PRE_BY_REGEX:
            return _PRE_BY_REGEX[regex], ""
    if kinds[:1] == ["Digits"] and kinds[1:] == ["ByteLevel"]:
        return "smollm", ""
    return "default", f"pre-tokenizer {'+'.join(map(str, kinds)) or 'none'} has no llama.cpp name; written as 'default' (llama.cpp may split text differently)"


def _pad(keys: dict[str, Any], n_vocab: int) -> dict[str, Any]:
    """Tokens up to the model's vocab_size (the embedding's rows), as convert_hf_to_gguf.py pads."""
    tokens = keys["tokenizer.ggml.tokens"]
    extra = range(len(tokens), n_vocab)
    return keys | {"tokenizer.ggml.tokens": tokens + [f"[PAD{i}]" for i in extra],
                   "tokenizer.ggml.scores": keys["tokenizer.ggml.scores"] + [-1000.0] * len(extra),
                   "tokenizer.ggml.token_type": keys["tokenizer.ggml.token_type"] + [5] * len(extra)}


TOKEN_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")


def source_tokens(source: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The token arrays of the GGUF file a base was converted from (as gguf_source.json records it),
    if that file is still there unchanged; else none (the tokenizer files' then stand)."""
    import gguf

    path = Path(str(source.get("source", "")))
    try:
        unchanged = path.is_file() and path.stat().st_size == source.get("size") and path.stat().st_mtime_ns == source.get("mtime_ns")
        if not unchanged:
            return {}, "token arrays rebuilt from the converted tokenizer: the source file is gone or changed"
        fields = gguf.GGUFReader(path).fields
    except (OSError, ValueError):
        return {}, "token arrays rebuilt from the converted tokenizer: the source file cannot be read"
    found = {k: fields[k].contents() for k in TOKEN_ARRAYS if k in fields}
    return found, "token arrays copied from it"
