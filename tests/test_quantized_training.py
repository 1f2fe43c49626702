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
from lora_models import make_tokenizer, max_diff, mlx_logits, ours, random_adapter
from mlx.utils import tree_flatten
from test_quantized import float_source, llama_and_rows, mlx_convert

import finetune
from finetune.engines.mlx.lora import LoRALinear
from finetune.errors import UserError

TRAIN = ("--iters", "3", "--batch-size", "2", "--learning-rate", "1e-2", "--lora-rank", "4")


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qlora")
    source, data = llama_and_rows(root)
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
    # two implementations (our dequantize-then-BLAS path vs mlx-lm's quantized kernel): fp32 round-off
    assert max_diff(mlx_logits(ours_model), mlx_logits(reference)) <= 5e-5


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
    assert max_diff(mlx_logits(rebuilt), mlx_logits(reference)) <= 5e-5  # fp32 round-off, as above
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
    from finetune.engines.mlx.step import flat_trainable

    model = ours(bases["q4"], q4_run)
    model.unfreeze(keys=["lora_a", "lora_b"], strict=False)
    trainable = flat_trainable(model)
    assert trainable and all(k.endswith((".lora_a", ".lora_b")) for k in trainable)
    assert {v.dtype for v in trainable.values()} == {mx.float32}
    packed = [v for k, v in tree_flatten(model.parameters()) if k.endswith("q_proj.linear.weight")]
    assert packed and all(v.dtype == mx.uint32 for v in packed)


# ---------------------------------------------------------------------------------------------
# ft fuse on quantized bases


def test_fusing_into_a_quantized_base_writes_a_model_quantized_like_it(tmp_path, capsys, bases):
    adapter = random_adapter(bases["float"], tmp_path / "adapter", b_std=0.2)
    out = tmp_path / "fused"
    code, stdout, err = run_cli(capsys, "fuse", bases["q4"], "--adapter", adapter, "--output", out)
    assert code == 0, err
    written = json.loads((out / "config.json").read_text())
    assert written["quantization"] == written["quantization_config"]
    assert (written["quantization"]["bits"], written["quantization"]["group_size"]) == (4, 32)
    fused = mlx_logits(ours(out))
    reference, _ = mlx_lm.load(str(out))
    assert max_diff(fused, mlx_logits(reference)) <= 1e-5  # mlx-lm reads it as we do
    adapted, base = mlx_logits(ours(bases["q4"], adapter)), mlx_logits(ours(bases["q4"]))
    assert max_diff(fused, adapted) < max_diff(base, adapted)  # closer to the adapter model than the base


def test_an_update_lost_in_requantization_is_refused_and_dequantize_keeps_it(tmp_path, capsys, bases):
    adapter = random_adapter(bases["float"], tmp_path / "adapter", b_std=1e-3)
    code, _, err = run_cli(capsys, "fuse", bases["q4"], "--adapter", adapter, "--output", tmp_path / "q")
    assert code == 2
    line = error_line(err)
    assert "the adapter's effect rounds away re-quantized (4-bit affine, group size 32)" in line
    assert "fuse with --dequantize" in line and not (tmp_path / "q").exists()
    out = tmp_path / "float"
    code, stdout, err = run_cli(capsys, "fuse", bases["q4"], "--adapter", adapter, "--output", out, "--dequantize")
    assert code == 0, err
    assert "quantization" not in json.loads((out / "config.json").read_text())
    assert max_diff(mlx_logits(ours(out)), mlx_logits(ours(bases["q4"], adapter))) <= 1e-4


def test_fusing_a_quantize_on_load_run_rebuilds_its_base(tmp_path, capsys, bases):
    run = train(capsys, bases["float"], bases["data"], tmp_path / "run", "--quantize-bits", "8",
                "--quantize-group-size", "32")
    out = tmp_path / "fused"
    code, stdout, err = run_cli(capsys, "fuse", bases["float"], "--adapter", run, "--output", out, "--dequantize")
    assert code == 0, err
    expected = mlx_logits(ours(bases["float"], run))  # the 8-bit base it trained on, with the adapter
    assert max_diff(mlx_logits(ours(out)), expected) <= 1e-4


def test_qlora_in_bfloat16_keeps_lora_the_optimizer_and_the_loss_in_float32(tmp_path, capsys, bases):
    from safetensors.numpy import load_file

    run = train(capsys, bases["q4"], bases["data"], tmp_path / "run", "--dtype", "bfloat16")
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(m["train_loss"] == m["train_loss"] for m in metrics)  # finite, not NaN
    saved = load_file(str(run / "adapters.safetensors"))
    assert saved and {v.dtype.name for v in saved.values()} == {"float32"}
    step = sorted((run / "checkpoints").glob("step-*"))[-1]
    optimizer = mx.load(str(next(step.glob("optimizer*.safetensors"))))
    assert optimizer and {v.dtype for k, v in optimizer.items() if v.ndim} == {mx.float32}


def test_quantizing_on_load_never_holds_the_whole_float_model(tmp_path, bases):
    from finetune.core import quantization
    from finetune.engines.mlx.load import load_model
    from finetune.engines.mlx.model import build

    config = {**json.loads((bases["float"] / "config.json").read_text()), "hidden_size": 256,
              "intermediate_size": 704, "num_hidden_layers": 4, "head_dim": 64, "tie_word_embeddings": False}
    model = build(config)
    tensors = dict(tree_flatten(model.parameters()))
    d = tmp_path / "wider"
    d.mkdir()
    for f in bases["float"].iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            (d / f.name).write_bytes(f.read_bytes())
    mx.save_safetensors(str(d / "model.safetensors"), tensors, metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(config))
    float_bytes = sum(v.nbytes for v in tensors.values())
    del model, tensors
    mx.clear_cache()
    mx.reset_peak_memory()
    loaded, _ = load_model(str(d), cache=False, quantize=quantization.on_load(4, 64)).unwrap()
    peak = mx.get_peak_memory()
    assert isinstance(loaded.lm_head, nn.QuantizedLinear)
    assert peak < 0.5 * float_bytes  # the 4-bit model plus about one float layer at a time


def test_qlora_on_a_quantized_gpt2_checkpoint_matches_mlx_lm(tmp_path, capsys, bases):
    tok, vocab = make_tokenizer(tmp_path / "tok")
    source = float_source("gpt2", vocab, tok, tmp_path / "gpt2")
    q8 = mlx_convert(source, tmp_path / "gpt2-q8", q_bits=8, q_group_size=64)
    run = train(capsys, q8, bases["data"], tmp_path / "run")
    assert json.loads((run / "adapter_config.json").read_text())["base_quantization"]["bits"] == 8
    reference, _ = mlx_lm.load(str(q8), adapter_path=str(run))
    assert max_diff(mlx_logits(ours(q8, run)), mlx_logits(reference)) <= 1e-5
