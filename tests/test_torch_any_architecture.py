"""The torch engine trains any architecture transformers has (here GPT-NeoX, built small by
transformers itself), and `auto` routes one the MLX engine does not implement (OPT) to it;
transformers' unknowns are one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from cli_run import one_line_error, run_cli
from model_factory import plus_data
from peft import PeftModel
from safetensors.numpy import load_file
from transformers import (
    AutoModelForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

from finetune.engines import choose
from finetune.engines.torch import load as torch_load
from finetune.files.tiny import ensure_tiny

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def neox(tmp_path_factory):
    """A 2-layer GPT-NeoX in HF layout with the tiny model's tokenizer (vocabulary 2048)."""
    out = tmp_path_factory.mktemp("neox") / "model"
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=2048, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=256, bos_token_id=0, eos_token_id=1)
    GPTNeoXForCausalLM(config).save_pretrained(out)
    for f in ensure_tiny().iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def opt(tmp_path_factory, neox):
    """A 2-layer OPT (an architecture without an MLX engine row) with the same tokenizer."""
    out = tmp_path_factory.mktemp("opt") / "model"
    torch.manual_seed(0)
    config = OPTConfig(vocab_size=2048, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                       word_embed_proj_dim=64, max_position_embeddings=256, bos_token_id=0, eos_token_id=1)
    OPTForCausalLM(config).save_pretrained(out)
    for f in neox.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out


def test_auto_routes_an_architecture_mlx_lacks_to_torch(opt, monkeypatch):
    monkeypatch.delenv("FT_BACKEND", raising=False)
    needs = choose.model_needs(str(opt))
    assert needs == choose.ModelNeeds(quantized=False, model_type="opt", mlx_knows=False)
    mac = choose.Machine(mlx=True, torch=True, apple_silicon=True, nvidia_gpu=False, linux_x86=False, native_bf16=False)
    reason = "opt (not an MLX engine architecture)"
    assert choose.decide("auto", "", mac, needs_torch=reason) == ("torch", f"auto: {reason} needs the torch engine")


def test_gpt_neox_trains_generates_and_is_described_with_torch(neox, tmp_path, capsys):
    data = plus_data(tmp_path / "data", 12)
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "start", str(neox), str(data), "--backend", "torch", "--iters", "3",
                             "--batch-size", "2", "--eval-every", "0", "--output", str(run))
    assert code == 0, err
    saved = load_file(run / "adapters.safetensors")
    assert "gpt_neox.layers.1.attention.query_key_value.lora_a" in saved and len(saved) == 2 * 2 * 4
    keys = json.loads((run / "adapter_config.json").read_text())["lora_parameters"]["keys"]
    assert keys == ["attention.dense", "attention.query_key_value", "mlp.dense_4h_to_h", "mlp.dense_h_to_4h"]

    code, text, err = run_cli(capsys, "generate", str(neox), "--adapter", str(run), "--prompt", "Q: 1 plus 1?\nA: ",
                              "--max-tokens", "4", "--backend", "torch")
    assert code == 0 and "backend: torch" in err, err
    code, out, err = run_cli(capsys, "adapters", "export", str(run), "--format", "peft", "--output", str(tmp_path / "peft"))
    assert code == 0, err
    ours = torch_load.load(str(neox), str(run), torch.device("cpu")).unwrap()[0]
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(neox), tmp_path / "peft").eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert (ours(ids).logits - theirs(ids).logits).abs().max() < 1e-5  # peft reads the run's adapter
    code, out, err = run_cli(capsys, "models", "info", str(neox), "--backend", "torch")
    assert code == 0, err
    assert "gpt_neox" in out and "329,216" in out  # transformers' own count of the parameters
    code, out, err = run_cli(capsys, "train", "start", str(neox), str(data), "--lora-keys", "mlp.nope",
                             "--backend", "torch", "--output", str(tmp_path / "refused"))
    assert code == 2 and "$.lora.keys: mlp.nope not in a gpt_neox block" in one_line_error(err), err
    code, out, err = run_cli(capsys, "train", "validate", str(data), "--model", str(neox), "--backend", "torch")
    assert code == 0 and "OK: ready to train." in out, out


def test_mlx_and_transformers_unknowns_are_one_line(neox, opt, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "start", str(opt), "sql", "--backend", "mlx", "--output", str(tmp_path / "a"))
    assert code == 2 and "architecture 'opt' is not implemented by the MLX engine" in one_line_error(err)
    alien = tmp_path / "alien"
    shutil.copytree(neox, alien)
    config = json.loads((alien / "config.json").read_text())
    (alien / "config.json").write_text(json.dumps({**config, "model_type": "no_such_model"}))
    code, _, err = run_cli(capsys, "train", "start", str(alien), "sql", "--backend", "torch", "--output", str(tmp_path / "b"))
    line = one_line_error(err)
    assert code == 2 and "does not know this model" in line and "no_such_model" in line, err
    assert not (tmp_path / "b").exists()
