"""Fine-tune types: DoRA on the MLX engine (mlx-lm's adapter layout, loaded by mlx-lm with our
logits), DoRA fused into the weights, DoRA exported to PEFT (`use_dora`, `lora_magnitude_vector`)
with PEFT's logits, DoRA on the torch engine (peft's `use_dora`), and the recipe field.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from cli_run import error_line, run_cli
from lora_models import (
    build_hf,
    make_tokenizer,
    max_diff,
    mlx_logits,
    ours,
    reverse_rows,
    torch_logits,
    write_model,
)

from finetune.cli import main

TOL = 5e-5  # float32 round-off between two implementations (RoPE angles, bias order) on logits of size ~5


@pytest.fixture(scope="module", autouse=True)
def _module_home(module_home):
    """conftest's module_home for every fixture of this module."""


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny Llama with attention and MLP biases (DoRA must leave the bias out of its norm)."""
    root = tmp_path_factory.mktemp("dora")
    tok, vocab = make_tokenizer(root / "tok")
    return write_model(build_hf("llama-bias", vocab, seed=3), root / "llama", tok)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    for name, rows in (("train", reverse_rows(32)), ("valid", reverse_rows(4, 32))):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def _train(base: Path, data: Path, out: Path, *extra: str) -> Path:
    argv = ["train", "start", str(base), str(data), "--iters", "4", "--batch-size", "4",
            "--learning-rate", "1e-2", "--save-every", "2", "--eval-every", "0", "--output", str(out), *extra]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def dora_run(tmp_path_factory, base, data) -> Path:
    return _train(base, data, tmp_path_factory.mktemp("runs") / "dora", "--fine-tune-type", "dora")


def test_dora_run_is_an_mlx_lm_dora_adapter(dora_run, base):
    config = json.loads((dora_run / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "dora"
    tensors = mx.load(str(dora_run / "adapters.safetensors"))
    paths = {k.rpartition(".")[0] for k in tensors}
    assert {k for k in tensors if k.endswith(".m")} == {f"{p}.m" for p in paths}
    for p in paths:
        assert tensors[f"{p}.m"].shape == (tensors[f"{p}.lora_b"].shape[1],)
        assert tensors[f"{p}.m"].dtype == mx.float32


def test_mlx_lm_loads_our_dora_adapter_with_our_logits(dora_run, base):
    import mlx_lm

    theirs, _ = mlx_lm.load(str(base), adapter_path=str(dora_run))
    mine, plain = ours(base, dora_run), ours(base)
    assert max_diff(mlx_logits(mine), mlx_logits(theirs)) <= TOL
    assert max_diff(mlx_logits(mine), mlx_logits(plain)) > 1e-2  # the adapter really matters


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_fused_dora_gives_the_adapter_logits_in_transformers_and_mlx_lm(tmp_path, capsys, dora_run, base, backend):
    import mlx_lm
    from transformers import AutoModelForCausalLM

    out = tmp_path / "fused"
    code, _, err = run_cli(capsys, "fuse", base, "--adapter", dora_run, "--output", out, "--backend", backend)
    assert code == 0, err
    adapted = mlx_logits(ours(base, dora_run))
    assert max_diff(mlx_logits(mlx_lm.load(str(out))[0]), adapted) <= TOL
    hf = AutoModelForCausalLM.from_pretrained(out, dtype="float32").eval()
    assert max_diff(torch_logits(hf), adapted) <= TOL


def test_an_adapter_mlx_lm_trained_with_dora_loads_with_mlx_lm_logits(tmp_path, base):
    """mlx-lm's own DoRA layers (their `m` moved off the base's norms) saved as mlx-lm saves them."""
    import mlx_lm
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = mlx_lm.load(str(base))
    model.freeze()
    settings = {"rank": 4, "scale": 3.0, "dropout": 0.0, "keys": ["self_attn.q_proj", "mlp.down_proj"]}
    linear_to_lora_layers(model, 1, settings, use_dora=True)
    rng = np.random.default_rng(0)
    for _, module in model.named_modules():
        if hasattr(module, "m"):
            module.lora_b = mx.array(0.1 * rng.standard_normal(module.lora_b.shape).astype(np.float32))
            module.m = module.m * mx.array(1.0 + 0.2 * rng.standard_normal(module.m.shape).astype(np.float32))
    out = tmp_path / "mlx-lm-dora"
    out.mkdir()
    mx.save_safetensors(str(out / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    (out / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "dora", "num_layers": 1, "lora_parameters": settings}))
    assert max_diff(mlx_logits(ours(base, out)), mlx_logits(model)) <= TOL
    assert max_diff(mlx_logits(ours(base, out)), mlx_logits(ours(base))) > 1e-2


@pytest.fixture(scope="module")
def torch_dora_run(tmp_path_factory, base, data) -> Path:
    return _train(base, data, tmp_path_factory.mktemp("runs") / "torch-dora", "--fine-tune-type", "dora", "--backend", "torch")


def test_torch_engine_trains_dora_that_mlx_lm_and_ft_load_alike(torch_dora_run, base):
    """peft's `use_dora` run, saved in mlx-lm's DoRA layout: mlx-lm, FineTune's MLX engine and the
    torch engine (`ft generate --backend torch` loads this way) give the same logits."""
    import mlx_lm

    from finetune.engines.torch.load import load

    config = json.loads((torch_dora_run / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "dora"
    mine = mlx_logits(ours(base, torch_dora_run))
    assert max_diff(mine, mlx_logits(mlx_lm.load(str(base), adapter_path=str(torch_dora_run))[0])) <= TOL
    assert max_diff(mine, mlx_logits(ours(base))) > 1e-2
    import torch

    lm, _ = load(str(base), str(torch_dora_run), torch.device("cpu")).unwrap()
    assert max_diff(torch_logits(lm), mine) <= TOL


def _peft_model(base: Path, adapter: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(base, dtype="float32")
    return PeftModel.from_pretrained(hf, adapter).eval()


def test_dora_exports_to_peft_with_use_dora_and_peft_logits(tmp_path, capsys, dora_run, base):
    out = tmp_path / "peft"
    code, _, err = run_cli(capsys, "adapters", "export", dora_run, "--output", out)
    assert code == 0, err
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    names = mx.load(str(out / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in names
    assert max_diff(torch_logits(_peft_model(base, out)), mlx_logits(ours(base, dora_run))) <= TOL
    back = tmp_path / "back"  # and back: the same mlx-lm DoRA adapter
    assert run_cli(capsys, "adapters", "import", out, "--output", back)[0] == 0
    assert json.loads((back / "adapter_config.json").read_text())["fine_tune_type"] == "dora"
    first, again = mx.load(str(dora_run / "adapters.safetensors")), mx.load(str(back / "adapters.safetensors"))
    assert first.keys() == again.keys() and all(mx.array_equal(first[k], again[k]).item() for k in first)


def test_a_peft_made_dora_adapter_loads_with_peft_logits(tmp_path, base):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(base, dtype="float32")
    made = get_peft_model(hf, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"], use_dora=True))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in made.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
            elif "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.2 * torch.randn_like(p))
    made.save_pretrained(tmp_path / "peft")
    made.eval()
    assert max_diff(mlx_logits(ours(base, tmp_path / "peft")), torch_logits(made)) <= TOL


def test_peft_magnitudes_without_use_dora_are_refused_in_one_line(tmp_path, capsys, dora_run, base):
    out = tmp_path / "peft"
    assert run_cli(capsys, "adapters", "export", dora_run, "--output", out)[0] == 0
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}))
    code, _, err = run_cli(capsys, "generate", base, "--adapter", out, "--prompt", "hi", "--max-tokens", "2")
    assert code == 2 and "lora_magnitude_vector is a DoRA magnitude" in error_line(err)


@pytest.mark.parametrize(("fixture", "extra"), [("dora_run", ()), ("torch_dora_run", ("--backend", "torch"))])
def test_a_resumed_dora_run_is_bit_identical(tmp_path, request, base, data, fixture, extra):
    whole = request.getfixturevalue(fixture)
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    shutil.rmtree(cut / "checkpoints" / "step-0000004")
    (cut / "adapters.safetensors").unlink()
    _train(base, data, cut, "--fine-tune-type", "dora", *extra, "--resume")
    assert (cut / "adapters.safetensors").read_bytes() == (whole / "adapters.safetensors").read_bytes()
    opt_whole, opt_cut = (mx.load(str(d / "checkpoints/step-0000004/optimizer.safetensors")) for d in (whole, cut))
    assert opt_whole.keys() == opt_cut.keys()  # the magnitudes' Adam moments too
    assert any(k.endswith(".m.v") for k in opt_whole)
    assert all(mx.array_equal(opt_whole[k], opt_cut[k]).item() for k in opt_whole)


def test_generate_with_a_dora_run_on_both_engines(capsys, dora_run, base):
    outputs = []
    for backend in ("mlx", "torch"):
        code, out, err = run_cli(capsys, "generate", base, "--adapter", dora_run, "--prompt", "hello world",
                                 "--max-tokens", "6", "--backend", backend)
        assert code == 0, err
        outputs.append(out.strip())
    assert outputs[0] and outputs[0] == outputs[1]


def test_dora_on_a_base_quantized_on_load_trains_and_generates(tmp_path, capsys, base, data):
    """As mlx-lm: DoRA's norm is taken of the dequantized weight (QDoRA)."""
    run = _train(base, data, tmp_path / "qdora", "--fine-tune-type", "dora", "--quantize-bits", "8",
                 "--quantize-group-size", "32")
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "dora" and config["base_quantization"]
    losses = [json.loads(line)["train_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if "train_loss" in line]
    assert losses and all(np.isfinite(losses))
    code, _, err = run_cli(capsys, "generate", base, "--adapter", run, "--prompt", "hello world", "--max-tokens", "4")
    assert code == 0, err
    import mlx.nn as nn
    import mlx_lm
    from mlx_lm.tuner.utils import load_adapters

    theirs = mlx_lm.load(str(base))[0]  # mlx-lm's QDoRA: the same 8-bit base, our adapter on it
    nn.quantize(theirs, group_size=32, bits=8)
    load_adapters(theirs, str(run))
    mine = mlx_logits(ours(base, run))
    assert max_diff(mine, mlx_logits(theirs)) <= TOL


def test_the_recipe_field_round_trips_and_bad_values_exit_2(tmp_path, capsys, dora_run, base, data):
    from finetune.core.config import Recipe
    from finetune.shell import recipes

    saved = (dora_run / "recipe.toml").read_text()
    assert 'fine_tune_type = "dora"' in saved
    assert recipes.load(dora_run / "recipe.toml").unwrap().lora.fine_tune_type == "dora"
    assert Recipe().lora.fine_tune_type == "lora"
    code, _, err = run_cli(capsys, "train", "start", base, data, "--fine-tune-type", "half", "--output", tmp_path / "x")
    assert code == 2 and "half" in err and "Traceback" not in err
    bad = tmp_path / "bad.toml"
    bad.write_text('[lora]\nfine_tune_type = "qlora"\n')
    code, _, err = run_cli(capsys, "train", "start", base, data, "--recipe", bad, "--output", tmp_path / "y")
    assert code == 2 and "$.lora.fine_tune_type" in error_line(err)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_a_dora_gguf_adapter_is_refused_in_one_line(tmp_path, capsys, dora_run):
    out = tmp_path / "a.gguf"
    code, _, err = run_cli(capsys, "export", dora_run, "--format", "gguf-adapter", "--output", out)
    assert code == 2 and "is a DoRA magnitude" in error_line(err)
    assert not out.exists()


def test_the_memory_plan_counts_the_dora_magnitudes(dora_run):
    """The estimate's trainable count is what the DoRA run trained (factors and magnitudes)."""
    import msgspec

    from finetune.core import memory, modelinfo
    from finetune.shell import recipes

    recipe = recipes.load(dora_run / "recipe.toml").unwrap()
    config = json.loads((Path(recipe.model.path) / "config.json").read_text())
    facts = modelinfo.facts(config).unwrap()
    tensors = mx.load(str(dora_run / "adapters.safetensors"))
    assert memory.lora_parameters(facts, recipe) == sum(v.size for v in tensors.values())
    lora_only = msgspec.structs.replace(recipe, lora=msgspec.structs.replace(recipe.lora, fine_tune_type="lora"))
    assert memory.lora_parameters(facts, lora_only) == sum(v.size for k, v in tensors.items() if not k.endswith(".m"))
