"""SentencePiece-style tokenizers (Metaspace, "▁" prepended per call) tokenize segment by segment
without a spurious space before each segment, and keep the prompt-prefix property."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from finetune.core.records import Message, Sample
from finetune.core.templates import render, render_prompt
from finetune.core.tokenize import tokenize
from finetune.files.tokenizer import encoder, load_tokenizer, specials

CORPUS = ["hello world, how are you?\nfine thanks", "SELECT name FROM t WHERE x = 1\n", "assistant user system\n"] * 40
SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    alphabet = sorted(set("".join(CORPUS)) - {" "}) + ["▁"]
    tok.train_from_iterator(CORPUS, trainer=trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, initial_alphabet=alphabet))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   additional_special_tokens=SPECIALS[3:])
    out = Path(tmp_path_factory.mktemp("sp"))
    fast.save_pretrained(str(out))
    return load_tokenizer(out)


def pieces(tok, ids) -> list[str]:
    return tok.convert_ids_to_tokens(list(ids))


def test_the_probe_tokenizer_really_prepends_a_space_per_call(sp_tokenizer):
    raw = sp_tokenizer("world", add_special_tokens=False)["input_ids"]
    assert pieces(sp_tokenizer, raw)[0].startswith("▁")


def test_a_segment_after_a_special_token_has_no_spurious_space(sp_tokenizer):
    encode = encoder(sp_tokenizer)
    whole = sp_tokenizer("<|im_start|>assistant\nworld<|im_end|>", add_special_tokens=False)["input_ids"]
    joined = encode("<|im_start|>assistant\n") + encode("world<|im_end|>")
    assert pieces(sp_tokenizer, joined) == pieces(sp_tokenizer, whole)
    assert not pieces(sp_tokenizer, encode("world"))[0].startswith("▁")


def test_chatml_training_ids_equal_the_whole_conversation_and_keep_the_prefix_property(sp_tokenizer):
    sp, encode = specials(sp_tokenizer), encoder(sp_tokenizer)
    # (contents chosen so that no BPE merge of this toy vocabulary spans a segment boundary)
    messages = (Message("user", "hello world"), Message("assistant", "thanks"),
                Message("user", "how are you?"), Message("assistant", "SELECT name"))
    full = tokenize(render(Sample(format="chat", messages=messages), "chatml", sp).unwrap(), encode, sp)
    text = "".join(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in messages)
    whole = sp_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert not sp.add_bos and list(full.ids) == whole
    trained = [i for i, m in zip(full.ids, full.mask, strict=True) if m]
    assert sp_tokenizer.decode(trained) == "thanks<|im_end|>SELECT name<|im_end|>"
    prompt = tokenize(render_prompt(messages[:3], "chatml", sp).unwrap(), encode, sp)
    assert full.ids[: len(prompt.ids)] == prompt.ids
