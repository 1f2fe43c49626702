"""PEFT interop: our exports load in `peft` with our logits, adapters made by `peft` import and load
with peft's logits (rsLoRA, skipped layers, GPT-2 Conv1D), round trips are bitwise, unsupported
PEFT features are refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from lora_models import (
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
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

import finetune
from finetune.errors import UserError

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    tok, vocab = make_tokenizer(root / "tok")
    return {v: write_model(build_hf(v, vocab), root / v, tok) for v in ("llama", "gpt2")}


def hf(base: Path):
    return AutoModelForCausalLM.from_pretrained(base).eval()


def peft_adapter(base: Path, out: Path, seed: int = 5, **config) -> PeftModel:
    """An adapter made by `peft` itself (random lora_B so it matters), saved with save_pretrained."""
    model = get_peft_model(hf(base), LoraConfig(**config))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    model.save_pretrained(out)
    return model.eval()


def lora_modules(model: PeftModel) -> set[str]:
    return {n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "lora_A") and m.lora_A}


@pytest.mark.parametrize(("variant", "keys", "num_layers", "targets", "modules"), [
    ("llama", None, -1, LLAMA_TARGETS, 14),
    ("llama", ("self_attn.q_proj", "self_attn.v_proj"), 1, ["q_proj", "v_proj"], 2),
    ("gpt2", None, -1, ["c_attn", "c_fc", "c_proj"], 8),
    ("gpt2", ("attn.c_proj", "mlp.c_fc"), -1, ["attn.c_proj", "c_fc"], 4),
])
def test_export_loads_in_peft_with_our_logits(tmp_path, capsys, bases, variant, keys, num_layers, targets, modules):
    base = bases[variant]
    adapter = random_adapter(base, tmp_path / "ours", rank=4, scale=2.5, keys=keys, num_layers=num_layers)
    out = tmp_path / "peft"
    code, stdout, err = run_cli(capsys, "adapters", "export", adapter, "--format", "peft", "--output", out)
    assert code == 0, err
    assert "Wrote PEFT adapter" in stdout
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    assert config["r"] == 4 and config["lora_alpha"] == 10 and config["use_rslora"] is False
    assert sorted(config["target_modules"]) == sorted(targets)
    assert config["layers_to_transform"] == (None if num_layers < 0 else [1])
    assert config["fan_in_fan_out"] is (variant == "gpt2")
    assert config["base_model_name_or_path"] == str(base)

    ours_file, theirs = load_file(str(adapter / "adapters.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    assert len(theirs) == len(ours_file) == 2 * modules
    first = sorted(ours_file)[0]  # model.layers.N... / model.h.N...
    path = first.removesuffix(".lora_a").replace("model.h.", "transformer.h.")
    assert np.array_equal(theirs[f"base_model.model.{path}.lora_A.weight"], ours_file[first].T)

    model = PeftModel.from_pretrained(hf(base), out).eval()
    assert len(lora_modules(model)) == modules  # nothing more adapted than the export holds
    expected = mlx_logits(ours(base, adapter))
    assert max_diff(torch_logits(model), expected) <= 1e-4
    assert max_diff(expected, mlx_logits(ours(base))) > 0.1


PEFT_CASES = {
    "llama": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "llama-rslora": ("llama", dict(r=4, lora_alpha=3, target_modules=LLAMA_TARGETS, use_rslora=True)),
    "llama-last-layer": ("llama", dict(r=2, lora_alpha=16, target_modules=["o_proj"], layers_to_transform=[1])),
    "gpt2": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
}


@pytest.mark.parametrize("case", PEFT_CASES)
def test_a_peft_made_adapter_imports_and_gives_peft_logits(tmp_path, capsys, bases, case):
    variant, config = PEFT_CASES[case]
    base = bases[variant]
    made = peft_adapter(base, tmp_path / "peft", **config)
    expected = torch_logits(made)
    assert max_diff(expected, torch_logits(hf(base))) > 0.05

    direct = mlx_logits(ours(base, tmp_path / "peft"))  # a PEFT dir loads as it is
    assert max_diff(direct, expected) <= 1e-4

    out = tmp_path / "mlx"
    code, _, err = run_cli(capsys, "adapters", "import", tmp_path / "peft", "--output", out)
    assert code == 0, err
    written = json.loads((out / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / (config["r"] ** 0.5 if config.get("use_rslora") else config["r"])
    assert written["lora_parameters"]["scale"] == scale and written["lora_parameters"]["rank"] == config["r"]
    assert written["num_layers"] == (1 if "layers_to_transform" in config else -1)
    imported = mlx_logits(ours(base, out))
    assert all(np.array_equal(a, b) for a, b in zip(imported, direct, strict=True))


def test_mlx_lm_reads_an_imported_gpt2_peft_adapter_as_ours(tmp_path, capsys, bases):
    base = bases["gpt2"]
    peft_adapter(base, tmp_path / "peft", r=4, lora_alpha=8, target_modules=["c_attn"])
    assert run_cli(capsys, "adapters", "import", tmp_path / "peft", "--output", tmp_path / "mlx")[0] == 0
    keys = set(load_file(str(tmp_path / "mlx" / "adapters.safetensors")))
    assert keys == {f"model.h.{i}.attn.c_attn.{leaf}" for i in range(2) for leaf in ("lora_a", "lora_b")}


def tensors_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a)


@pytest.mark.parametrize("case", PEFT_CASES)
def test_peft_to_ours_to_peft_is_exact(tmp_path, capsys, bases, case):
    variant, config = PEFT_CASES[case]
    peft_adapter(bases[variant], tmp_path / "a", **config)
    assert run_cli(capsys, "adapters", "import", tmp_path / "a", "--output", tmp_path / "b")[0] == 0
    assert run_cli(capsys, "adapters", "export", tmp_path / "b", "--output", tmp_path / "c")[0] == 0
    first, back = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("a", "c"))
    assert tensors_equal(first, back)
    a, c = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("a", "c"))
    for field in ("r", "lora_alpha", "use_rslora", "layers_to_transform", "fan_in_fan_out", "lora_dropout",
                  "base_model_name_or_path", "bias", "peft_type"):
        assert a[field] == c[field], field
    assert sorted(a["target_modules"]) == sorted(c["target_modules"])


@pytest.mark.parametrize(("variant", "num_layers", "dtype"), [("llama", -1, "float32"), ("gpt2", 1, "bfloat16")])
def test_ours_to_peft_to_ours_is_exact(tmp_path, capsys, bases, variant, num_layers, dtype):
    base = bases[variant]
    adapter = random_adapter(base, tmp_path / "a", rank=3, scale=0.1, num_layers=num_layers)
    if dtype != "float32":  # the tensors keep their dtype both ways
        tensors = {k: v.astype(getattr(mx, dtype)) for k, v in mx.load(str(adapter / "adapters.safetensors")).items()}
        mx.save_safetensors(str(adapter / "adapters.safetensors"), tensors)
    assert run_cli(capsys, "adapters", "export", adapter, "--output", tmp_path / "b")[0] == 0
    alpha = json.loads((tmp_path / "b" / "adapter_config.json").read_text())["lora_alpha"]
    assert abs(alpha / 3 - 0.1) <= 2e-17  # no float has alpha / 3 == 0.1; the nearest is written
    assert run_cli(capsys, "adapters", "import", tmp_path / "b", "--output", tmp_path / "c")[0] == 0
    first, back = (mx.load(str(tmp_path / d / "adapters.safetensors")) for d in ("a", "c"))
    assert first.keys() == back.keys()
    for k in first:
        assert first[k].dtype == back[k].dtype == getattr(mx, dtype)
        assert mx.array_equal(first[k].view(mx.uint16), back[k].view(mx.uint16)).item()
    a, c = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("a", "c"))
    assert {k: v for k, v in c.items() if k != "peft"} == a


@pytest.mark.parametrize(("config", "message"), [
    (dict(rank_pattern={"q_proj": 4}), "per-module ranks (rank_pattern) is not supported"),
    (dict(bias="lora_only"), "bias 'lora_only'"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
])
def test_unsupported_peft_features_are_refused_by_name(tmp_path, capsys, bases, config, message):
    peft_adapter(bases["llama"], tmp_path / "a", r=2, lora_alpha=4, target_modules=["q_proj"], **config)
    code, _, err = run_cli(capsys, "adapters", "import", tmp_path / "a", "--output", tmp_path / "b")
    assert code == 2 and message in one_line_error(err)
    assert not (tmp_path / "b").exists()
    with pytest.raises(UserError, match=message.split(" (")[0]):
        finetune.load(str(bases["llama"]), adapter=str(tmp_path / "a"))


def test_skipped_layers_need_the_model_to_import(tmp_path, capsys, bases):
    base = bases["llama"]
    made = peft_adapter(base, tmp_path / "a", r=2, lora_alpha=4, target_modules=["q_proj"], layers_to_transform=[1])
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    code, _, err = run_cli(capsys, "adapters", "import", tmp_path / "a", "--output", tmp_path / "b")
    assert code == 2 and "covers layers 1 only; pass --model" in one_line_error(err)
    code, _, err = run_cli(capsys, "adapters", "import", tmp_path / "a", "--output", tmp_path / "b", "--model", base)
    assert code == 0, err
    assert max_diff(mlx_logits(ours(base, tmp_path / "b")), torch_logits(made)) <= 1e-4


def test_layers_that_are_not_the_last_load_directly_but_do_not_import(tmp_path, capsys, bases):
    base = bases["llama"]
    made = peft_adapter(base, tmp_path / "a", r=2, lora_alpha=4, target_modules=["v_proj"], layers_to_transform=[0])
    assert max_diff(mlx_logits(ours(base, tmp_path / "a")), torch_logits(made)) <= 1e-4
    code, _, err = run_cli(capsys, "adapters", "import", tmp_path / "a", "--output", tmp_path / "b")
    assert code == 2 and "covers layers 0 of 2; mlx-lm adapters can only adapt the last layers" in one_line_error(err)


def test_a_mismatched_peft_adapter_names_its_first_bad_tensor(tmp_path, bases):
    peft_adapter(bases["gpt2"], tmp_path / "gpt2", r=2, lora_alpha=4, target_modules=["c_attn"])
    with pytest.raises(UserError) as err:
        finetune.load(str(bases["llama"]), adapter=str(tmp_path / "gpt2"))
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight names a layer this model does not have" in str(err.value)

    peft_adapter(bases["llama"], tmp_path / "bad", r=2, lora_alpha=4, target_modules=["q_proj", "k_proj"])
    path = tmp_path / "bad" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    name = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    tensors[name] = np.zeros((2, 63), np.float32)
    from safetensors.numpy import save_file

    save_file(tensors, str(path))
    with pytest.raises(UserError) as err:
        finetune.load(str(bases["llama"]), adapter=str(tmp_path / "bad"))
    assert f"{path}: {name} has shape (2, 63), the model needs (2, 64)" in str(err.value)
