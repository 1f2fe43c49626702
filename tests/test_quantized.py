"""Quantized checkpoints in mlx-lm's layout: written by mlx-lm's own `convert` and by hand with
`mx.quantize`, loaded through `finetune.load`, with mlx-lm's logits; bad quantization blocks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest
from cli_run import error_line, run_cli
from lora_models import build_hf, make_tokenizer, max_diff, mlx_logits, ours, write_model
from mlx.utils import tree_flatten
from mlx_lm import convert

from finetune.core import quantization
from finetune.core.fusing import fused_config
from finetune.engines.mlx.quantized import layers as quantized_layers

FAMILIES = ("llama", "mistral", "qwen2", "gpt2")


def float_source(variant: str, vocab: int, tokenizer_dir: Path, directory: Path) -> Path:
    """A float32 HF dir that mlx-lm reads as transformers does (top-level rope_theta, GPT-2's
    bare tensor names and n_ctx, a Mistral window wider than the test rows)."""
    model = build_hf(variant, vocab)
    if variant == "mistral":
        model.config.sliding_window = 4096  # mlx-lm's Llama ignores the window
    write_model(model, directory, tokenizer_dir)
    config = fused_config(json.loads((directory / "config.json").read_text()), "float32")
    (directory / "config.json").write_text(json.dumps(config))
    if variant == "gpt2":  # the hub's gpt2 layout, which mlx-lm's sanitize expects
        tensors = mx.load(str(directory / "model.safetensors"))
        bare = {k.removeprefix("transformer."): v for k, v in tensors.items() if k != "lm_head.weight"}
        mx.save_safetensors(str(directory / "model.safetensors"), bare, metadata={"format": "pt"})
    return directory


REVERSE_ROWS = [{"prompt": f"Q: reverse {w}\nA: ", "completion": w[::-1]} for w in
                ("abc", "hello", "select", "world", "quant", "mlx", "lora", "fuse")]


def llama_and_rows(root: Path) -> tuple[Path, Path]:
    """(`float_source`'s llama in root/float with its own tokenizer, REVERSE_ROWS as root/data.jsonl)."""
    tok, vocab = make_tokenizer(root / "tok")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in REVERSE_ROWS))
    return float_source("llama", vocab, tok, root / "float"), data


def mlx_convert(source: Path, out: Path, **options) -> Path:
    convert(str(source), str(out), quantize=True, dtype="float32", **options)
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quantized")
    tok, vocab = make_tokenizer(root / "tok")
    return {v: float_source(v, vocab, tok, root / v) for v in (*FAMILIES, "llama-tied")}


def reference(path: Path) -> list:
    model, _ = mlx_lm.load(str(path))
    return mlx_logits(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_mlx_lm_quantized_checkpoints_give_mlx_lm_logits(tmp_path, sources, family):
    out = mlx_convert(sources[family], tmp_path / "q4", q_bits=4, q_group_size=64)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and "quantization_config" in config
    logits = mlx_logits(ours(out))
    assert max_diff(logits, reference(out)) <= 1e-5
    assert max_diff(logits, mlx_logits(ours(sources[family]))) > 1e-3  # it did quantize


@pytest.mark.parametrize(("bits", "group", "mode"), [
    (2, 32, "affine"), (3, 64, "affine"), (5, 128, "affine"), (6, 32, "affine"), (8, 128, "affine"),
    (4, 32, "mxfp4"), (8, 32, "mxfp8"), (4, 16, "nvfp4"),
])
def test_every_bit_width_group_size_and_mode(tmp_path, sources, bits, group, mode):
    out = mlx_convert(sources["llama-tied"], tmp_path / "q", q_bits=bits, q_group_size=group, q_mode=mode)
    model = ours(out)
    found = {p for p in quantized_layers(model).values() if p is not None}
    assert found == {quantization.Params(group_size=group, bits=bits, mode=mode)}
    # the embedding (also the tied head) is quantized whenever the group divides its width 64
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding) == (64 % group == 0)
    assert max_diff(mlx_logits(model), reference(out)) <= 1e-5


def test_the_modes_table_is_what_the_installed_mlx_offers():
    w = mx.random.normal((8, 128))
    for mode, (bits_ok, groups_ok, _) in quantization.MODES.items():
        for bits in bits_ok:
            for group in groups_ok:
                packed, *_ = mx.quantize(w, group_size=group, bits=bits, mode=mode)
                assert packed.shape == (8, 128 * bits // 32)


def test_per_layer_overrides_mixed_bits_and_float_layers(tmp_path, sources):
    def mixed(path, module):
        if path.endswith("down_proj"):
            return {"group_size": 32, "bits": 8}
        return not path.endswith("o_proj")  # o_proj stays float (mlx-lm writes nothing for it)

    out = mlx_convert(sources["llama"], tmp_path / "mixed", q_bits=4, q_group_size=64, quant_predicate=mixed)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["model.layers.0.mlp.down_proj"]["bits"] == 8
    config["quantization"]["model.layers.1.self_attn.o_proj"] = False  # the explicit spelling
    (out / "config.json").write_text(json.dumps(config))
    model = ours(out)
    assert model.model.layers[0].mlp.down_proj.bits == 8 and model.model.layers[0].mlp.up_proj.bits == 4
    assert isinstance(model.model.layers[1].self_attn.o_proj, nn.Linear)
    assert max_diff(mlx_logits(model), reference(out)) <= 1e-5


def hand_quantized(source: Path, out: Path, bits: int = 4, group: int = 32) -> Path:
    """A checkpoint quantized with `mx.quantize` directly, in mlx-lm's layout and config."""
    shutil.copytree(source, out)
    tensors = dict(mx.load(str(source / "model.safetensors")))
    for name in [k for k in tensors if k.endswith(".weight") and tensors[k].ndim == 2]:
        w, scales, biases = mx.quantize(tensors[name], group_size=group, bits=bits)
        path = name.removesuffix(".weight")
        tensors |= {name: w, f"{path}.scales": scales, f"{path}.biases": biases}
    mx.save_safetensors(str(out / "model.safetensors"), tensors, metadata={"format": "mlx"})
    config = json.loads((source / "config.json").read_text())
    config["quantization"] = config["quantization_config"] = {"group_size": group, "bits": bits}
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_a_checkpoint_quantized_by_hand_loads_like_mlx_lm(tmp_path, sources):
    out = hand_quantized(sources["qwen2"], tmp_path / "q")
    assert max_diff(mlx_logits(ours(out)), reference(out)) <= 1e-5
    code, stdout, err = run_cli_info(out)
    assert code == 0, err
    assert "4-bit affine, group size 32" in stdout


def run_cli_info(path: Path):
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from finetune.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["models", "info", str(path)])
    return code, out.getvalue(), err.getvalue()


def _edit_config(path: Path, **quant) -> None:
    config = json.loads((path / "config.json").read_text())
    config["quantization"] = {**config["quantization"], **quant}
    config.pop("quantization_config", None)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(("edit", "expect"), [
    ({"mode": "int3"}, "quantization mode 'int3' is unknown; MLX offers affine, mxfp4, mxfp8, nvfp4"),
    ({"bits": 8}, "says 8-bit for lm_head but its stored weight"),
    ({"group_size": 128}, "group_size 128 does not divide lm_head's input width 64"),
    ({"group_size": 64}, "says group_size 64 for lm_head but its scales"),
    ({"bits": 7}, "affine quantization takes bits 1, 2, 3, 4, 5, 6, 8, got 7"),
])
def test_bad_quantization_blocks_get_one_line(tmp_path, capsys, sources, edit, expect):
    out = hand_quantized(sources["qwen2"], tmp_path / "q")
    _edit_config(out, **edit)
    code, _, err = run_cli(capsys, "generate", out, "--prompt", "hi", "--max-tokens", "2")
    assert code == 2
    assert expect in error_line(err)


@pytest.mark.parametrize("method", ["bitsandbytes", "gptq", "awq", "fp8"])
def test_huggingface_side_quantization_is_refused_naming_the_method(tmp_path, capsys, sources, method):
    out = shutil.copytree(sources["llama"], tmp_path / method)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": method, "bits": 4}}))
    code, _, err = run_cli(capsys, "generate", out, "--prompt", "hi", "--max-tokens", "2")
    assert code == 2
    line = error_line(err)
    assert f"quantized with {method!r}" in line and "mlx_lm convert -q" in line


def test_the_quantization_block_round_trips_and_describes():
    block = {"group_size": 64, "bits": 4, "mode": "affine", "a.b": {"group_size": 32, "bits": 8}, "c": False}
    quant = quantization.parse_block(block, "x").unwrap()
    assert quant.as_config() == {**block, "a.b": {"group_size": 32, "bits": 8, "mode": "affine"}}
    four, eight = quant.default, quant.overrides["a.b"]
    assert quantization.describe({"p": four, "q": four, "a.b": eight, "c": None}) == quantization.Quant(
        default=four, overrides={"a.b": eight, "c": None})
    assert quantization.describe({"p": None}) is None
    assert quantization.from_config({}).unwrap() is None
    assert "int9" in quantization.parse_block({"bits": 4, "mode": "int9"}, "x").failure()


def test_quantized_checkpoints_are_not_cached_and_stay_quantized(tmp_path, sources):
    out = mlx_convert(sources["gpt2"], tmp_path / "q8", q_bits=8, q_group_size=32)
    model = ours(out)
    packed = dict(tree_flatten(model.parameters()))
    assert packed["transformer.h.0.attn.c_attn.weight"].dtype == mx.uint32
    assert isinstance(model.transformer.wte, nn.QuantizedEmbedding)


def test_half_precision_checkpoints_compute_in_float32_on_the_cpu_and_keep_bfloat16_when_asked(tmp_path, sources):
    import finetune

    out = mlx_convert_dtype(sources["llama"], tmp_path / "bf16", "bfloat16")
    code, stdout, err = run_cli_info(out)
    assert code == 0, err
    assert "bfloat16 (computes in float32 on this CPU" in stdout and "4-bit affine, group size 64" in stdout
    auto, _ = finetune.load(str(out))
    assert auto.model.norm.weight.dtype == mx.float32 and auto.model.layers[0].mlp.up_proj.scales.dtype == mx.float32
    kept, _ = finetune.load(str(out), dtype="bfloat16")  # what `auto` picks on a GPU
    assert kept.model.layers[0].mlp.up_proj.scales.dtype == mx.bfloat16
    assert max_diff(mlx_logits(kept), reference(out)) <= 1e-5  # mlx-lm computes in bfloat16 too


def mlx_convert_dtype(source: Path, out: Path, dtype: str) -> Path:
    convert(str(source), str(out), quantize=True, q_bits=4, q_group_size=64, dtype=dtype)
    return out
