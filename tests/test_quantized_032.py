"""mlx-lm 0.32's quantized checkpoints, written by its own `convert` from a tiny HF llama: the
`mixed_3_6` recipe (per-layer entries with `"group_size": null`) and the `mxfp4`, `mxfp8`, `nvfp4`
modes load with mlx-lm's logits, train QLoRA, generate, and fuse dequantized."""

from __future__ import annotations

import json
from pathlib import Path

import mlx_lm
import pytest
import torch
from cli_run import error_line, run_cli
from lora_models import (
    build_hf,
    make_tokenizer,
    max_diff,
    mlx_logits,
    ours,
    torch_logits,
    write_model,
)
from mlx_lm import convert
from model_factory import plus_data
from returns.result import Failure

from finetune.core import quantization
from finetune.core.fusing import fused_config
from finetune.core.quantization import INFER, Params, Quant

RECIPES = {  # name -> mlx_lm.convert options
    "mixed_3_6": {"quant_predicate": "mixed_3_6"},
    "mxfp4": {"q_mode": "mxfp4"},
    "mxfp8": {"q_mode": "mxfp8"},
    "nvfp4": {"q_mode": "nvfp4"},
}
TOL = 1e-4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Every recipe converted by mlx-lm from one float32 tiny llama (top-level rope_theta, as the
    hub writes it, which mlx-lm reads)."""
    root = tmp_path_factory.mktemp("q032")
    tok, vocab = make_tokenizer(root / "tok")
    source = write_model(build_hf("llama-tied", vocab), root / "float", tok)
    config = fused_config(json.loads((source / "config.json").read_text()), "float32")
    (source / "config.json").write_text(json.dumps(config))
    out = {}
    for name, options in RECIPES.items():
        convert(str(source), str(root / name), quantize=True, dtype="float32", **options)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return plus_data(tmp_path_factory.mktemp("q032-data"), 10)


def test_mixed_3_6_stores_null_group_sizes(checkpoints):
    block = json.loads((checkpoints["mixed_3_6"] / "config.json").read_text())["quantization"]
    nulls = [p for p, v in block.items() if isinstance(v, dict) and v["group_size"] is None]
    assert nulls and all(block[p]["bits"] in (3, 6) for p in nulls)


@pytest.mark.parametrize("recipe", RECIPES)
def test_loads_with_mlx_lm_logits(checkpoints, recipe):
    path = checkpoints[recipe]
    assert max_diff(mlx_logits(ours(path)), mlx_logits(mlx_lm.load(str(path))[0])) <= TOL


@pytest.mark.parametrize("recipe", RECIPES)
def test_qlora_trains_generates_and_fuses_dequantized(checkpoints, data, tmp_path, capsys, recipe):
    path, run, fused = checkpoints[recipe], tmp_path / "run", tmp_path / "fused"
    code, _, err = run_cli(capsys, "train", "start", path, data, "--backend", "mlx", "--iters", "2",
                           "--batch-size", "2", "--eval-every", "0", "--learning-rate", "1e-2", "--output", run)
    assert code == 0, err
    record = json.loads((run / "adapter_config.json").read_text())["base_quantization"]
    assert record["mode"] == ("affine" if recipe == "mixed_3_6" else recipe)
    assert all(v["group_size"] for v in record.values() if isinstance(v, dict))  # inferred, concrete
    adapted = mlx_logits(ours(path, run))
    assert max_diff(adapted, mlx_logits(mlx_lm.load(str(path), adapter_path=str(run))[0])) <= TOL
    assert max_diff(adapted, mlx_logits(ours(path))) > 1e-3  # the adapter does something

    code, out, err = run_cli(capsys, "generate", path, "--adapter", run, "--prompt", "Q: 1 plus 1?\nA: ",
                             "--max-tokens", "3", "--backend", "mlx")
    assert code == 0 and "tokens/s" in err, err

    code, _, err = run_cli(capsys, "fuse", path, "--adapter", run, "--output", fused, "--dequantize")
    assert code == 0, err
    config = json.loads((fused / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(fused, dtype=torch.float32).eval()
    assert max_diff(torch_logits(hf), adapted) <= TOL


def test_null_group_size_is_inferred_from_the_scales():
    block = {"group_size": 64, "bits": 4, "mode": "affine", "a": {"group_size": None, "bits": 3, "mode": "affine"}}
    quant = quantization.parse_block(block, "config.json").unwrap()
    assert quant.params("a") == Params(group_size=INFER, bits=3, mode="affine")
    stored = {"a": ((8, 128 * 3 // 32), (8, 4)), "b": ((8, 128 * 4 // 32), (8, 2))}
    plan = quantization.stored_plan(quant, {"a": 128, "b": 128}, stored, "m").unwrap()
    assert plan == {"a": Params(group_size=32, bits=3), "b": Params(group_size=64, bits=4)}


def test_null_group_size_that_the_scales_cannot_explain_is_one_line():
    quant = Quant(default=Params(group_size=INFER, bits=4, mode="mxfp4"))
    found = quantization.stored_plan(quant, {"a": 128}, {"a": ((8, 16), (8, 8))}, "m")  # group 16: nvfp4's
    assert isinstance(found, Failure)
    assert found.failure() == ("m: quantization.a: group_size is null and scales (8, 8) over input width 128 "
                               "give no mxfp4 group size (32)")
    assert "needs a group size" in quantization.load_plan(quant, {"a": 128}, "--quantize-group-size").failure()


def test_a_mode_mlx_does_not_know_is_refused_by_name(checkpoints, tmp_path, capsys):
    directory = tmp_path / "m"
    directory.mkdir()
    for f in checkpoints["mxfp4"].iterdir():
        (directory / f.name).write_bytes(f.read_bytes())
    config = json.loads((directory / "config.json").read_text())
    config["quantization"] = config["quantization_config"] = {"group_size": 32, "bits": 4, "mode": "mxfp3"}
    (directory / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "generate", directory, "--prompt", "hi", "--backend", "mlx")
    assert code == 2
    assert "quantization mode 'mxfp3' is unknown; MLX offers affine, mxfp4, mxfp8, nvfp4" in error_line(err)
