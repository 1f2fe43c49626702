"""`ft fuse`: fused HF dirs that transformers and mlx-lm load with the adapter model's logits, the
fused-vs-adapter check (vanishing updates, tolerances), shards, quantized bases, CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
import torch
from lora_models import (
    bases_with_adapters,
    build_hf,
    make_tokenizer,
    max_diff,
    mlx_logits,
    one_line_error,
    ours,
    random_adapter,
    run_cli,
    torch_logits,
    write_model,
)
from mlx.utils import tree_flatten
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from finetune.engines.mlx.lora import attach_adapter
from finetune.engines.mlx.model import build

VARIANTS = ("llama", "llama-tied", "gpt2")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "bpe")


@pytest.fixture(scope="module")
def bases(tmp_path_factory, tok):
    """Each variant's base dir (float32) and an all-linear adapter with random lora_b."""
    return bases_with_adapters(tmp_path_factory.mktemp("fuse"), tok, VARIANTS)


def header(path: Path) -> tuple[dict, dict]:
    """(metadata, {name: (dtype, shape)}) of a safetensors file."""
    with safe_open(str(path), "pt") as f:
        return f.metadata(), {k: (str(f.get_slice(k).get_dtype()), tuple(f.get_slice(k).get_shape())) for k in f.keys()}  # noqa: SIM118


@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_model_loads_in_transformers_and_mlx_lm_with_the_adapter_logits(tmp_path, capsys, bases, variant):
    import mlx_lm

    base, adapter = bases[variant]
    out = tmp_path / "fused"
    code, stdout, err = run_cli(capsys, "fuse", base, "--adapter", adapter, "--output", out)
    assert code == 0, err
    assert "max |diff|" in stdout and "(float32;" in stdout
    files = sorted(p.name for p in out.iterdir())
    assert files == ["chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
                     "tokenizer.json", "tokenizer_config.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float32" and "quantization" not in config

    metadata, tensors = header(out / "model.safetensors")
    assert metadata == {"format": "pt"}
    if variant == "gpt2":  # bare GPT-2 names, Conv1D layout (in, out) as the hub's gpt2
        assert tensors["h.0.attn.c_attn.weight"] == ("F32", (64, 192))
        assert tensors["h.0.mlp.c_proj.weight"] == ("F32", (256, 64))
    assert ("lm_head.weight" in tensors) == (variant == "llama")

    expected = mlx_logits(ours(base, adapter))
    assert max_diff(expected, mlx_logits(ours(base))) > 0.1  # the adapter matters
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert max_diff(torch_logits(hf), expected) <= 1e-4
    theirs, _ = mlx_lm.load(str(out))
    assert max_diff(mlx_logits(theirs), expected) <= 1e-4
    assert max_diff(mlx_logits(ours(out)), expected) <= 1e-4


def test_big_models_are_written_in_shards_with_an_index(tmp_path, capsys, bases):
    base, adapter = bases["llama"]
    out = tmp_path / "sharded"
    code, _, err = run_cli(capsys, "fuse", base, "--adapter", adapter, "--output", out, "--max-shard-size", "100KB")
    assert code == 0, err
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 3 and not (out / "model.safetensors").exists()
    assert shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    held = {}
    for shard in shards:
        metadata, tensors = header(shard)
        assert metadata == {"format": "pt"}
        held |= dict.fromkeys(tensors, shard.name)
    assert index["weight_map"] == held
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert max_diff(torch_logits(hf), mlx_logits(ours(base, adapter))) <= 1e-4


@pytest.mark.parametrize(("dtype", "tag"), [("bfloat16", "BF16"), ("float16", "F16")])
def test_half_precision_fuse_of_a_normal_adapter_succeeds_and_reports_its_differences(tmp_path, capsys, bases, dtype, tag):
    base, adapter = bases["llama"]
    out = tmp_path / dtype
    code, stdout, err = run_cli(capsys, "fuse", base, "--adapter", adapter, "--output", out, "--dtype", dtype)
    assert code == 0, err
    assert f"after fusing in {dtype}" in stdout and "tolerance" in stdout and "of its effect kept" in stdout
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype
    _, tensors = header(out / "model.safetensors")
    assert {t for t, _ in tensors.values()} == {tag}
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    expected = mlx_logits(ours(base, adapter))
    assert 1e-5 < max_diff(torch_logits(hf), expected) < 0.05 * max(abs(x).max() for x in expected)


@pytest.fixture(scope="module")
def bf16_base(tmp_path_factory, tok):
    """A bfloat16 checkpoint whose block weights are at least 0.25 in magnitude."""
    model = build_hf("llama-tied", tok[1], seed=3, away_from_zero=0.25).to(torch.bfloat16)
    return write_model(model, tmp_path_factory.mktemp("bf16") / "llama", tok[0])


def test_an_adapter_whose_update_rounds_away_is_refused_and_nothing_is_written(tmp_path, capsys, bf16_base):
    # |ΔW| < 5e-4 everywhere, below half a bfloat16 step (~1e-3) of every |W| >= 0.25
    adapter = random_adapter(bf16_base, tmp_path / "tiny-adapter", b_std=2e-4)
    out = tmp_path / "fused"
    code, _, err = run_cli(capsys, "fuse", bf16_base, "--adapter", adapter, "--output", out)
    line = one_line_error(err)
    assert code == 2
    assert "rounds away in bfloat16" in line and "--dtype float32" in line and str(out) in line
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    code, stdout, err = run_cli(capsys, "fuse", bf16_base, "--adapter", adapter, "--output", out, "--dtype", "float32")
    assert code == 0, err
    assert "(float32;" in stdout
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert max_diff(torch_logits(hf), mlx_logits(ours(bf16_base, adapter))) <= 1e-4


def test_the_check_uses_the_first_rows_of_data(tmp_path, capsys, bases):
    base, adapter = bases["gpt2"]
    data = tmp_path / "rows.jsonl"
    rows = [{"text": "SELECT name FROM users"}, {"prompt": "hello", "completion": " world"},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"text": "never used"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, stdout, err = run_cli(capsys, "fuse", base, "--adapter", adapter, "--output", tmp_path / "o",
                                "--data", data, "--rows", "3")
    assert code == 0, err
    assert "check on 3 rows" in stdout


def test_existing_output_is_refused_unless_forced(tmp_path, capsys, bases):
    base, adapter = bases["llama"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "fuse", base, "--adapter", adapter, "--output", out)
    assert code == 2 and "--force" in one_line_error(err) and (out / "keep.txt").is_file()
    code, _, err = run_cli(capsys, "fuse", base, "--adapter", adapter, "--output", out, "--force")
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli(capsys, "fuse", base, "--adapter", adapter, "--output", empty)[0] == 0


@pytest.mark.parametrize("case", ["missing", "mismatched", "other-architecture", "output-is-model", "bad-shard-size"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, bases, case):
    base, adapter = bases["llama"]
    args = ["fuse", base, "--adapter", adapter, "--output", tmp_path / "out"]
    expect = ""
    if case == "missing":
        args[3] = tmp_path / "nope"
        expect = f"{tmp_path / 'nope'}: no such adapter directory"
    elif case == "mismatched":  # one tensor of the wrong shape
        bad = tmp_path / "bad-adapter"
        bad.mkdir()
        (bad / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())
        tensors = mx.load(str(adapter / "adapters.safetensors"))
        tensors["model.layers.1.self_attn.v_proj.lora_b"] = mx.zeros((4, 31))
        mx.save_safetensors(str(bad / "adapters.safetensors"), tensors)
        args[3] = bad
        expect = "model.layers.1.self_attn.v_proj.lora_b has shape (4, 31), the model needs (4, 32)"
    elif case == "other-architecture":  # a GPT-2 adapter on a Llama
        args[3] = bases["gpt2"][1]
        expect = "attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj not in this model's blocks"
    elif case == "output-is-model":
        args[5] = base
        args.append("--force")
        expect = "is the model directory itself"
    else:
        args += ["--max-shard-size", "lots"]
        expect = "--max-shard-size"
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    assert expect in one_line_error(err)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# MLX-quantized bases


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, bases, tok):
    """llama-tied quantized to 4 bits (mlx-lm layout: packed weight, scales, biases; config
    'quantization'), and an adapter for it."""
    source, adapter = bases["llama-tied"]
    config = json.loads((source / "config.json").read_text())
    model = ours(source)
    nn.quantize(model, group_size=32, bits=4)
    d = tmp_path_factory.mktemp("q") / "llama-4bit"
    d.mkdir()
    mx.save_safetensors(str(d / "model.safetensors"), dict(tree_flatten(model.parameters())), metadata={"format": "mlx"})
    (d / "config.json").write_text(json.dumps({**config, "quantization": {"group_size": 32, "bits": 4}}))
    for f in tok[0].iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    return d, adapter, config, source


def test_a_quantized_base_fuses_into_a_model_quantized_the_same_way(tmp_path, capsys, quantized):
    d, adapter, _, _ = quantized
    code, stdout, err = run_cli(capsys, "fuse", d, "--adapter", adapter, "--output", tmp_path / "o")
    assert code == 0, err
    assert "quantized 4-bit affine, group size 32" in stdout
    written = json.loads((tmp_path / "o" / "config.json").read_text())
    assert written["quantization"]["bits"] == 4 and written["quantization_config"] == written["quantization"]


def test_dequantize_then_fuse_matches_the_adapter_on_the_quantized_model(tmp_path, capsys, quantized):
    d, adapter, config, source = quantized
    out = tmp_path / "o"
    code, stdout, err = run_cli(capsys, "fuse", d, "--adapter", adapter, "--output", out, "--dequantize")
    assert code == 0, err
    assert "dequantized" in stdout
    written = json.loads((out / "config.json").read_text())
    assert "quantization" not in written and written["dtype"] == "float32"

    model = build(config)  # what QLoRA inference computes: quantized base + unfused LoRA
    nn.quantize(model, group_size=32, bits=4)
    model.load_weights(str(d / "model.safetensors"))
    attach_adapter(model, adapter).unwrap()
    expected = mlx_logits(model)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert max_diff(torch_logits(hf), expected) <= 1e-4
    assert max_diff(expected, mlx_logits(ours(source, adapter))) > 1e-2  # quantization mattered


# ---------------------------------------------------------------------------------------------
# the pure parts


def test_sizes_shards_and_configs():
    from finetune.core import fusing

    assert fusing.parse_size("2GB").unwrap() == 2 * 10**9
    assert fusing.parse_size("1.5 GiB").unwrap() == int(1.5 * 2**30)
    assert fusing.parse_size("500kb").unwrap() == 500_000 and fusing.parse_size("123").unwrap() == 123
    assert "expected a size" in fusing.parse_size("big").failure()
    plan = fusing.shard_plan({"a": 4, "b": 4, "c": 20, "d": 1}, 10)
    assert plan == [["a", "b"], ["c"], ["d"]]  # a tensor larger than a shard gets one to itself
    assert fusing.shard_names(3)[2] == "model-00003-of-00003.safetensors" and fusing.shard_names(1) == ["model.safetensors"]
    index = fusing.index_json(plan, {"a": 4, "b": 4, "c": 20, "d": 1})
    assert index["metadata"]["total_size"] == 29 and index["weight_map"]["c"] == "model-00002-of-00003.safetensors"

    llama = {"model_type": "llama", "torch_dtype": "float32", "rope_parameters": {"rope_theta": 500.0},
             "quantization": {"bits": 4, "group_size": 64}}
    written = fusing.fused_config(llama, "bfloat16")
    assert written["dtype"] == written["torch_dtype"] == "bfloat16" and written["rope_theta"] == 500.0
    assert "quantization" not in written and llama["torch_dtype"] == "float32"  # argument untouched
    assert fusing.fused_config({"model_type": "gpt2", "n_positions": 64}, "float32")["n_ctx"] == 64
    from finetune.core import quantization

    bnb = quantization.from_config({"quantization_config": {"quant_method": "bitsandbytes"}})
    assert "quantized with 'bitsandbytes'" in bnb.failure()
    assert quantization.from_config({"quantization": {"bits": 8, "group_size": 32}}).unwrap().bits == 8
    assert quantization.from_config({}).unwrap() is None


def test_the_verdict_refuses_non_finite_vanished_and_drifting_logits():
    import numpy as np

    from finetune.core import fusing

    base = [np.array([[1.0, -2.0, 3.0]])]
    adapter = [np.array([[1.5, -2.0, 2.0]])]
    ok = fusing.measure(base, adapter, base, adapter, "float32")
    assert fusing.verdict(ok).unwrap().kept == 1.0
    vanished = fusing.measure(base, adapter, base, base, "bfloat16")
    assert "rounds away in bfloat16" in fusing.verdict(vanished).failure()
    drift = fusing.measure(base, adapter, base, [np.array([[1.5, -2.0, 2.01]])], "float32")
    assert "disagrees with the adapter model" in fusing.verdict(drift).failure()
    nan = fusing.measure(base, adapter, base, [np.array([[float("nan"), 0.0, 0.0]])], "float16")
    assert "not finite in float16" in fusing.verdict(nan).failure()
