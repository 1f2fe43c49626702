"""The built-in `tiny` model: deterministic HF-layout files that transformers loads too."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from finetune.cli import main
from finetune.core.convert import expected_shapes
from finetune.engines.mlx.load import load_model
from finetune.files import tiny
from finetune.files.weights import read_checkpoint, safetensors_header

FILES = ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="module")
def homes(tmp_path_factory) -> tuple[Path, Path]:
    """tiny built from scratch twice, in two separate FINETUNE_HOME directories."""
    built = []
    with pytest.MonkeyPatch.context() as mp:
        for name in ("one", "two"):
            home = tmp_path_factory.mktemp(name)
            mp.setenv("FINETUNE_HOME", str(home))
            built.append(tiny.ensure_tiny())
    return built[0], built[1]


@pytest.fixture(autouse=True)
def _home(homes, monkeypatch, tmp_path):
    monkeypatch.setenv("FINETUNE_HOME", str(homes[0].parent.parent))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))


def test_same_seed_gives_bit_identical_files(homes):
    one, two = homes
    assert one != two and one.name == two.name == f"tiny-v{tiny.VERSION}"
    for name in FILES:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


def test_files_are_genuine_hf_layout(homes):
    directory = homes[0]
    header = safetensors_header(directory / "model.safetensors").unwrap()
    assert header["__metadata__"] == {"format": "pt"}
    config = json.loads((directory / "config.json").read_text())
    assert config == json.loads(json.dumps(tiny.CONFIG))
    assert "pipeline demo" in config["_finetune_note"]
    weights = read_checkpoint(directory).unwrap()
    assert weights.keys() == expected_shapes("llama", config).keys()


def test_initialisation_follows_the_recipe(homes):
    weights = read_checkpoint(homes[0]).unwrap()
    norms = [k for k in weights if k.endswith("norm.weight")]
    assert len(norms) == 2 * tiny.CONFIG["num_hidden_layers"] + 1
    assert all(mx.all(weights[k] == 1).item() for k in norms)
    embed = np.array(weights["model.embed_tokens.weight"])
    assert abs(embed.std() - 0.02) < 1e-3 and abs(embed.mean()) < 1e-3
    q0 = np.array(weights["model.layers.0.self_attn.q_proj.weight"])
    q1 = np.array(weights["model.layers.1.self_attn.q_proj.weight"])
    assert not np.array_equal(q0, q1)  # one key per parameter


def test_init_depends_only_on_the_seed():
    a, b, c = tiny.init_weights(), tiny.init_weights(), tiny.init_weights(tiny.SEED + 1)
    name = "model.layers.2.mlp.down_proj.weight"
    assert np.array_equal(a[name], b[name])
    assert not np.array_equal(a[name], c[name])


def test_transformers_loads_tiny_with_the_same_logits(homes):
    hf = LlamaForCausalLM.from_pretrained(homes[0], dtype=torch.float32).eval()
    model, tokenizer = load_model("tiny").unwrap()
    ids = np.array([tokenizer("SELECT name FROM users WHERE age > 30")["input_ids"]])
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(ids)).logits.numpy()
    ours = np.array(model(mx.array(ids)))
    assert ours.shape == (1, ids.shape[1], tiny.CONFIG["vocab_size"])
    assert np.abs(ours - theirs).max() <= 1e-4
    assert np.abs(ours).max() > 1e-2  # not trivially zero


def test_models_info_tiny_says_it_is_a_demo(capsys):
    assert main(["models", "info", "tiny"]) == 0
    out = capsys.readouterr().out
    for fact in (
        "pipeline demo",
        "architecture       llama",
        "layers             4",
        "attention heads    4 (kv heads 2, head dim 64)",
        "vocabulary         2,048",
        "tied embeddings    yes",
        "parameters         3,672,320",
        "chat template      yes",
        "LoRA memory",
    ):
        assert fact in out, fact


def test_models_list_shows_tiny(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "tiny" in out and "built-in" in out and "llama" in out and "3.7M" in out
    assert "pipeline demo" in out
