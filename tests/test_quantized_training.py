"""QLoRA end to end: train on a quantized checkpoint and on a float one quantized on load, the
adapter's record of its base, mlx-lm loading the run, and fusing into a quantized base."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest
from cli_run import error_line, run_cli
from lora_models import make_tokenizer, max_diff, mlx_logits, ours
from mlx.utils import tree_flatten
from test_quantized import float_source, mlx_convert

import finetune
from finetune.errors import UserError
from finetune.models.lora import LoRALinear

ROWS = [{"prompt": f"Q: reverse {w}\nA: ", "completion": w[::-1]} for w in
        ("abc", "hello", "select", "world", "quant", "mlx", "lora", "fuse")]
TRAIN = ("--iters", "3", "--batch-size", "2", "--learning-rate", "1e-2", "--lora-rank", "4")


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qlora")
    tok, vocab = make_tokenizer(root / "tok")
    source = float_source("llama", vocab, tok, root / "float")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return {
        "float": source, "data": data,
        "q4": mlx_convert(source, root / "q4", q_bits=4, q_group_size=32),
        "q8": mlx_convert(source, root / "q8", q_bits=8, q_group_size=32),
    }


def train(capsys, model: Path, data: Path, out: Path, *extra) -> Path:
    code, stdout, err = run_cli(capsys, "train", "start", model, data, *TRAIN, "--output", out, *extra)
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def q4_run(tmp_path_factory, bases) -> Path:
    from finetune.cli import main

    out = tmp_path_factory.mktemp("runs") / "q4"
    assert main([str(a) for a in ("train", "start", bases["q4"], bases["data"], *TRAIN, "--output", out)]) == 0
    return out


def test_qlora_on_a_quantized_checkpoint_records_its_base_and_mlx_lm_agrees(bases, q4_run):
    config = json.loads((q4_run / "adapter_config.json").read_text())
    record = config["base_quantization"]
    assert (record["bits"], record["group_size"], record["mode"], record["quantized_on_load"]) == (4, 32, "affine", False)
    ours_model = ours(bases["q4"], q4_run)
    wrapped = [m for _, m in ours_model.named_modules() if isinstance(m, LoRALinear)]
    assert wrapped and all(isinstance(m.linear, nn.QuantizedLinear) for m in wrapped)  # the base stays quantized
    assert all(m.lora_a.dtype == m.lora_b.dtype == mx.float32 for m in wrapped)
    assert any(mx.abs(m.lora_b).max().item() > 0 for m in wrapped)  # it trained
    reference, _ = mlx_lm.load(str(bases["q4"]), adapter_path=str(q4_run))
    assert max_diff(mlx_logits(ours_model), mlx_logits(reference)) <= 1e-5


def test_a_qlora_adapter_is_refused_on_another_base(bases, q4_run):
    for other, said in (("float", "this base is float"), ("q8", "this base is 8-bit affine")):
        with pytest.raises(UserError, match=f"trained on a 4-bit affine, group size 32 base, but {said}"):
            finetune.load(str(bases[other]), adapter=str(q4_run))


def test_quantize_on_load_trains_and_every_consumer_rebuilds_that_base(tmp_path, capsys, bases):
    run = train(capsys, bases["float"], bases["data"], tmp_path / "run",
                "--quantize-bits", "4", "--quantize-group-size", "32")
    record = json.loads((run / "adapter_config.json").read_text())["base_quantization"]
    assert record["quantized_on_load"] is True and record["bits"] == 4
    rebuilt = ours(bases["float"], run)  # the float checkpoint, quantized on load as in training
    assert isinstance(rebuilt.model.layers[0].self_attn.q_proj.linear, nn.QuantizedLinear)
    # quantizing on load is what `mlx_lm convert -q` computes from the same float32 weights
    reference, _ = mlx_lm.load(str(bases["q4"]), adapter_path=str(run))
    assert max_diff(mlx_logits(rebuilt), mlx_logits(reference)) <= 1e-5
    code, stdout, err = run_cli(capsys, "generate", bases["float"], "--adapter", run, "--prompt", "Q: reverse abc",
                                "--max-tokens", "3", "--temp", "0")
    assert code == 0, err


def test_quantize_bits_on_a_quantized_checkpoint_and_a_group_that_does_not_divide(tmp_path, capsys, bases):
    code, _, err = run_cli(capsys, "train", "start", bases["q4"], bases["data"], *TRAIN, "--output",
                           tmp_path / "a", "--quantize-bits", "8")
    assert code == 2 and "already quantized (4-bit affine, group size 32); drop --quantize-bits" in error_line(err)
    code, _, err = run_cli(capsys, "train", "start", bases["float"], bases["data"], *TRAIN, "--output",
                           tmp_path / "b", "--quantize-bits", "4", "--quantize-group-size", "128")
    assert code == 2
    assert "group size 128 does not divide lm_head's input width 64; use 32 or 64" in error_line(err)


def test_only_lora_trains_in_float32_on_a_quantized_base(bases, q4_run):
    from finetune.shell.trainer import flat_trainable

    model = ours(bases["q4"], q4_run)
    model.unfreeze(keys=["lora_a", "lora_b"], strict=False)
    trainable = flat_trainable(model)
    assert trainable and all(k.endswith((".lora_a", ".lora_b")) for k in trainable)
    assert {v.dtype for v in trainable.values()} == {mx.float32}
    packed = [v for k, v in tree_flatten(model.parameters()) if k.endswith("q_proj.linear.weight")]
    assert packed and all(v.dtype == mx.uint32 for v in packed)
