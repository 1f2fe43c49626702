"""Shared fixtures: real BPE tokenizers trained once per session, a tiny model dir, a private cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import finetune  # noqa: F401  first: loads the optimized BLAS before anything imports mlx
from finetune.files.tokenizer import load_tokenizer, train_bpe

# Tests name the engine they test; the rest (and their `ft` subprocesses) exercise the MLX engine,
# whatever `auto` would pick on this machine (tests of `auto` itself clear this).
os.environ["FT_BACKEND"] = "mlx"

TOKENIZER_VOCAB = 400

_TABLES = ("users", "orders", "books", "cities", "teams")
_COLUMNS = ("name", "age", "price", "year", "city", "score")
_WORDS = (
    "hello",
    "world",
    "how",
    "are",
    "you",
    "fine",
    "thanks",
    "today",
    "what",
    "is",
    "the",
    "answer",
)


def corpus() -> list[str]:
    """A few hundred short strings: SQL-ish, chat-ish and instruction-ish text (deterministic)."""
    texts: list[str] = []
    for i in range(120):
        t, c = _TABLES[i % len(_TABLES)], _COLUMNS[i % len(_COLUMNS)]
        texts.append(f"SELECT {c} FROM {t} WHERE id = {i}")
        texts.append(
            f"table: {t}\ncolumns: {', '.join(_COLUMNS)}\nQ: What is the {c} of row {i}?\nA: "
        )
        w = [_WORDS[(i + k) % len(_WORDS)] for k in range(5)]
        texts.append(f"{w[0]} {w[1]}, {w[2]} {w[3]} {w[4]}?")
        texts.append(f"### Instruction:\n{w[2]} {w[0]}\n\n### Response:\n{w[1]} {w[3]}")
    texts += ["system: You are a helpful assistant.", "user: hi", "assistant: hello there"]
    return texts


def write_model_dir(directory: Path, tokenizer_dir: Path) -> Path:
    """A tiny llama `config.json` beside a copy of the tokenizer files (validate reads no weights)."""
    directory.mkdir(parents=True, exist_ok=True)
    for f in tokenizer_dir.iterdir():
        (directory / f.name).write_bytes(f.read_bytes())
    from model_factory import llama_config

    vocab = len(load_tokenizer(tokenizer_dir))
    config = llama_config(vocab)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """Byte-level BPE (BOS added, chatml chat template) in HF layout."""
    return train_bpe(
        corpus(), tmp_path_factory.mktemp("tok") / "chatml", vocab_size=TOKENIZER_VOCAB
    )


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def plain_tokenizer_dir(tmp_path_factory) -> Path:
    """The same kind of tokenizer without a chat template and without BOS."""
    out = tmp_path_factory.mktemp("tok") / "plain"
    return train_bpe(corpus(), out, vocab_size=TOKENIZER_VOCAB, chat_template=None, add_bos=False)


@pytest.fixture(scope="session")
def plain_tokenizer(plain_tokenizer_dir):
    return load_tokenizer(plain_tokenizer_dir)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny llama: config.json + the chatml tokenizer (context 256)."""
    return write_model_dir(tmp_path_factory.mktemp("model") / "tiny-llama", tokenizer_dir)


@pytest.fixture(scope="session")
def plain_model_dir(tmp_path_factory, plain_tokenizer_dir) -> Path:
    """The tiny llama with the tokenizer that has no chat template and no BOS."""
    return write_model_dir(
        tmp_path_factory.mktemp("model") / "tiny-llama-plain", plain_tokenizer_dir
    )


@pytest.fixture(scope="session")
def finetune_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("finetune-home")


@pytest.fixture(scope="module")
def module_home(finetune_home):
    """FINETUNE_HOME (and no hub) for module-scoped fixtures too: `_private_cache` is per test."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_HOME", str(finetune_home))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield finetune_home


@pytest.fixture(autouse=True)
def _private_cache(monkeypatch, finetune_home):
    """Every test writes its cache (the `tiny` model) under a session temp dir, never in ~."""
    monkeypatch.setenv("FINETUNE_HOME", str(finetune_home))


@pytest.fixture
def offline_home(tmp_path, monkeypatch) -> Path:
    """A fresh FineTune home and an empty HF cache, offline: nothing leaks between tests."""
    monkeypatch.setenv("FINETUNE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    """A tokenizer directory written by `model_factory.tokenizer_files` (one per test module)."""
    from model_factory import tokenizer_files

    return tokenizer_files(tmp_path_factory.mktemp("tok") / "tok")
