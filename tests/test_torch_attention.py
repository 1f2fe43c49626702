"""The torch engine picks attention from the model class's own flags: sdpa where transformers
supports it, eager elsewhere (gemma2, whose soft-capping sdpa lacks), so gemma2 trains on torch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_run import run_cli
from model_factory import copy_files, plus_data
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM, LlamaForCausalLM

from finetune.engines.torch.load import load_base
from finetune.engines.torch.weights import attention


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory, tok) -> Path:
    """A 2-layer gemma2 saved by transformers (sliding window 4, soft-capping on)."""
    out = tmp_path_factory.mktemp("gemma2") / "model"
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                          max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    Gemma2ForCausalLM(config).save_pretrained(out)
    copy_files(tok, out)
    return out


def test_attention_follows_the_class_flags():
    assert attention(Gemma2ForCausalLM) == "eager"
    assert attention(LlamaForCausalLM) == "sdpa"


def test_gemma2_loads_with_eager_attention_and_transformers_logits(gemma2):
    ours = load_base(gemma2, torch.float32, str(gemma2)).unwrap()
    assert ours.config._attn_implementation == "eager"
    theirs = AutoModelForCausalLM.from_pretrained(gemma2, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.tensor([[3, 9, 4, 7, 5, 11, 6, 8, 10, 12]])  # longer than the window
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)


def test_gemma2_trains_and_generates_on_torch(gemma2, tmp_path, capsys):
    data = plus_data(tmp_path / "data", 10)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "start", gemma2, data, "--backend", "torch", "--iters", "2",
                           "--batch-size", "2", "--eval-every", "0", "--output", run)
    assert code == 0, err
    assert (run / "adapters.safetensors").is_file()
    code, _, err = run_cli(capsys, "generate", gemma2, "--adapter", run, "--prompt", "Q: 1 plus 1?\nA: ",
                           "--max-tokens", "3", "--backend", "torch")
    assert code == 0 and "tokens/s" in err, err
