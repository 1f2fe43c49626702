"""Tokenizers: load a model's tokenizer through transformers, or train a byte-level BPE one."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from finetune.core.tokenize import Specials

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _quiet_transformers() -> None:
    """FineTune needs only transformers' tokenizers: silence its notice that torch is absent."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def load_tokenizer(path: str | Path) -> Any:
    """A local HF tokenizer directory -> `PreTrainedTokenizerFast` (never runs remote code)."""
    _quiet_transformers()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)


def specials(tokenizer: Any) -> Specials:
    """BOS/EOS facts the pure tokenization needs, read off a transformers tokenizer."""
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos_id = tokenizer.bos_token_id
    return Specials(
        bos=tokenizer.bos_token or "",
        eos=tokenizer.eos_token or "",
        bos_id=bos_id if bos_id is not None else -1,
        eos_id=tokenizer.eos_token_id if tokenizer.eos_token_id is not None else -1,
        add_bos=bool(probe) and bos_id is not None and probe[0] == bos_id,
    )


def encoder(tokenizer: Any):
    """`str -> list[int]` without any special tokens added (the core adds BOS/EOS itself).

    Segments are encoded one at a time. SentencePiece-style tokenizers (Llama 2, TinyLlama,
    Mistral) prepend "▁" to the start of every call, which would put a space before each
    segment that the whole conversation never has; for those, each segment is encoded after a
    special token (which stops the prefix) and that token's id is dropped.
    """

    def plain(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    sentinel = next(
        (t for t in (tokenizer.eos_token, tokenizer.bos_token, tokenizer.unk_token) if t and len(plain(t)) == 1),
        None,
    )
    if sentinel is None:
        return plain

    def after_sentinel(text: str) -> list[int]:
        return plain(sentinel + text)[1:] if text else []

    probe = "a b\nc"
    return after_sentinel if after_sentinel(probe) != plain(probe) else plain


def train_bpe(
    texts: Iterable[str],
    out_dir: str | Path,
    *,
    vocab_size: int = 1024,
    bos: str = "<s>",
    eos: str = "</s>",
    pad: str = "<pad>",
    extra_specials: Sequence[str] = ("<|im_start|>", "<|im_end|>"),
    chat_template: str | None = CHATML_TEMPLATE,
    add_bos: bool = True,
    model_max_length: int = 2048,
) -> Path:
    """Train a byte-level BPE tokenizer on `texts` and save it in HF layout (atomically)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    _quiet_transformers()
    from transformers import PreTrainedTokenizerFast

    special = [bos, eos, pad, *extra_specials]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    if add_bos:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        additional_special_tokens=list(extra_specials),
        chat_template=chat_template,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        fast.save_pretrained(str(tmp))
        out.mkdir(exist_ok=True)
        for f in tmp.iterdir():
            f.replace(out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
