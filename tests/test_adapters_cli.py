"""`ft adapters inspect/export/import` in-process, and every adapter format loading through
`finetune.load` and `ft generate --adapter`: FineTune runs and checkpoints, mlx-lm-written
adapters, PEFT directories."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
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
from mlx.utils import tree_flatten

import finetune
from finetune.cli import main
from finetune.errors import UserError

BLOCK = ("mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj",
         "self_attn.q_proj", "self_attn.v_proj")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """llama-tied (mlx-lm reads its config as transformers does), a GPT-2, and a wider Llama."""
    root = tmp_path_factory.mktemp("models")
    tok, vocab = make_tokenizer(root / "tok")
    return {
        "llama": write_model(build_hf("llama-tied", vocab), root / "llama", tok),
        "gpt2": write_model(build_hf("gpt2", vocab), root / "gpt2", tok),
        "narrow": write_model(build_hf_with(vocab, intermediate_size=96), root / "narrow", tok),
    }


def build_hf_with(vocab: int, **changes):
    from hf_models import _CLASSES, tiny_config

    config = tiny_config("llama-tied")
    config.vocab_size = vocab
    for k, v in changes.items():
        setattr(config, k, v)
    return _CLASSES["llama"](config).eval()


@pytest.fixture(scope="module")
def run(tmp_path_factory, models):
    """A finished 2-step `ft train start` run (rank 4, every linear of the last layer), checkpointed."""
    root = tmp_path_factory.mktemp("run")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"SELECT name FROM users WHERE id = {i}"}) + "\n" for i in range(8)))
    out = root / "run"
    code = main(["train", "start", str(models["llama"]), str(data), "--iters", "2", "--batch-size", "2",
                              "--lora-rank", "4", "--lora-layers", "1", "--learning-rate", "0.05", "--output", str(out)])
    assert code == 0
    return out


def rows(text: str) -> dict[str, str]:
    """`key  value` lines of `ft adapters inspect` (keys may hold one space)."""
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition("  ")
        out[key.strip()] = value.strip()
    return out


def test_inspect_names_each_format(tmp_path, capsys, models, run):
    checkpoint = sorted((run / "checkpoints").iterdir())[-1]
    assert run_cli(capsys, "adapters", "export", run, "--format", "mlx-lm", "--output", tmp_path / "mlx")[0] == 0
    assert run_cli(capsys, "adapters", "export", run, "--output", tmp_path / "peft")[0] == 0
    expected = {
        run: "FineTune run directory",
        checkpoint: f"FineTune checkpoint (step 2 of run {run})",
        tmp_path / "mlx": "mlx-lm",
        tmp_path / "peft": "PEFT",
    }
    for directory, fmt in expected.items():
        code, out, err = run_cli(capsys, "adapters", "inspect", directory)
        assert code == 0, err
        found = rows(out)
        assert found["format"].startswith(fmt), found
        assert found["rank"] == "4"
        assert found["targets"] == ", ".join(BLOCK)
        assert found["layers"].startswith("1 (1 layers)")
        assert found["parameters"] == "4,096"  # 4 · Σ(in + out): q, o 128; k, v 96; gate, up, down 192
        assert found["base model"] == str(models["llama"])
    assert rows(run_cli(capsys, "adapters", "inspect", run)[1])["scale"] == "20 (as lora_alpha: 80)"
    assert rows(run_cli(capsys, "adapters", "inspect", tmp_path / "peft")[1])["scale"] == "20 = lora_alpha / r, lora_alpha 80"


def test_inspect_json_and_fit(capsys, models, run):
    code, out, err = run_cli(capsys, "adapters", "inspect", run, "--model", models["llama"], "--json")
    assert code == 0, err
    described = json.loads(out)
    assert described["rank"] == 4 and described[f"fits_{models['llama']}"] == "yes"


@pytest.mark.parametrize(("other", "message"), [
    ("gpt2", "adapter_config.json: mlp.down_proj, self_attn.q_proj not in this model's blocks (has: attn.c_attn,"),
    ("narrow", None),
])
def test_inspect_says_when_an_adapter_does_not_fit(tmp_path, capsys, models, other, message):
    adapter = random_adapter(models["llama"], tmp_path / "a", keys=("mlp.down_proj", "self_attn.q_proj"), num_layers=1)
    if other == "narrow":
        message = "model.layers.1.mlp.down_proj.lora_a has shape (128, 4), the model needs (96, 4)"
    code, out, err = run_cli(capsys, "adapters", "inspect", adapter, "--model", models[other])
    assert code == 2
    assert rows(out)[f"fits {models[other]}"] == "no"
    line = one_line_error(err)
    assert f"does not fit {models[other]}" in line and message in line


def test_every_format_loads_with_the_same_logits(tmp_path, capsys, models, run):
    base = models["llama"]
    checkpoint = sorted((run / "checkpoints").iterdir())[-1]
    assert run_cli(capsys, "adapters", "export", run, "--output", tmp_path / "peft")[0] == 0
    expected = mlx_logits(ours(base, run))
    assert max_diff(expected, mlx_logits(ours(base))) > 1e-3
    for adapter in (checkpoint, tmp_path / "peft"):
        got = mlx_logits(ours(base, adapter))
        assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True)), adapter


def test_an_adapter_written_by_mlx_lm_loads_with_mlx_lm_logits(tmp_path, capsys, models):
    import mlx_lm
    from mlx_lm.tuner.utils import linear_to_lora_layers

    base = models["llama"]
    model, _ = mlx_lm.load(str(base))
    model.freeze()
    settings = {"rank": 4, "scale": 3.0, "dropout": 0.0, "keys": ["self_attn.q_proj", "mlp.down_proj"]}
    linear_to_lora_layers(model, 1, settings)
    rng = np.random.default_rng(0)
    for _, m in model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = mx.array(rng.normal(0, 0.1, m.lora_b.shape).astype(np.float32))
    out = tmp_path / "mlx-lm"
    out.mkdir()
    mx.save_safetensors(str(out / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    (out / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "num_layers": 1, "lora_parameters": settings}))

    code, stdout, _ = run_cli(capsys, "adapters", "inspect", out)
    assert code == 0 and rows(stdout)["format"] == "mlx-lm"
    assert max_diff(mlx_logits(ours(base, out)), mlx_logits(model)) <= 1e-4


def test_generate_takes_a_peft_adapter(tmp_path, capsys, models):
    mlx = random_adapter(models["llama"], tmp_path / "mlx", b_std=0.5)
    assert run_cli(capsys, "adapters", "export", mlx, "--output", tmp_path / "peft")[0] == 0
    texts = []
    for adapter in (mlx, tmp_path / "peft", None):
        extra = ["--adapter", adapter] if adapter else []
        code, out, err = run_cli(capsys, "generate", models["llama"], "--prompt", "SELECT name", "--max-tokens", "8", *extra)
        assert code == 0, err
        texts.append(out)
    assert texts[0] == texts[1] != texts[2]


def test_generate_refuses_a_mismatched_adapter_naming_the_first_bad_tensor(tmp_path, capsys, models):
    adapter = random_adapter(models["llama"], tmp_path / "a", keys=("mlp.down_proj",))
    code, _, err = run_cli(capsys, "generate", models["narrow"], "--prompt", "hi", "--adapter", adapter)
    assert code == 2
    assert "model.layers.0.mlp.down_proj.lora_a has shape (128, 4), the model needs (96, 4)" in one_line_error(err)
    with pytest.raises(UserError, match="down_proj"):
        finetune.load(str(models["narrow"]), adapter=str(adapter))


def test_adapter_command_errors_are_one_line(tmp_path, capsys, run):
    (tmp_path / "empty").mkdir()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    cases = [
        (("adapters", "inspect", tmp_path / "nope"), f"{tmp_path / 'nope'}: no such adapter directory"),
        (("adapters", "inspect", tmp_path / "empty"), "not an adapter directory"),
        (("adapters", "export", tmp_path / "nope", "--output", tmp_path / "o"), "no such adapter directory"),
        (("adapters", "import", run, "--output", tmp_path / "o"), "already a FineTune run directory adapter, not PEFT"),
        (("adapters", "export", run, "--output", tmp_path / "taken"), "already exists and is not empty; pass --force"),
    ]
    for args, message in cases:
        code, _, err = run_cli(capsys, *args)
        assert code == 2, args
        assert message in one_line_error(err), args
    assert not (tmp_path / "o").exists() and (tmp_path / "taken" / "x").is_file()
    code, _, err = run_cli(capsys, "adapters", "export", run, "--output", tmp_path / "taken", "--force")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "taken").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_a_checkpoint_without_its_run_config_is_named(tmp_path, capsys, run):
    lone = tmp_path / "step-0000002"
    lone.mkdir()
    checkpoint = sorted((run / "checkpoints").iterdir())[-1]
    for f in checkpoint.iterdir():
        (lone / f.name).write_bytes(f.read_bytes())
    code, _, err = run_cli(capsys, "adapters", "inspect", lone)
    assert code == 2 and "a checkpoint without its run's adapter_config.json" in one_line_error(err)


def test_written_dirs_are_readable_by_others(tmp_path, capsys, run):
    assert run_cli(capsys, "adapters", "export", run, "--output", tmp_path / "peft")[0] == 0
    assert (tmp_path / "peft").stat().st_mode & 0o055 == 0o055 & ~_umask()


def _umask() -> int:
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_a_trained_run_and_its_last_checkpoint_fuse_to_the_same_model(tmp_path, capsys, models, run):
    from safetensors.numpy import load_file

    checkpoint = sorted((run / "checkpoints").iterdir())[-1]
    for name, adapter in (("run", run), ("checkpoint", checkpoint)):
        code, out, err = run_cli(capsys, "fuse", models["llama"], "--adapter", adapter, "--output", tmp_path / name)
        assert code == 0, err
        assert "Fused 7 LoRA layers" in out
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("run", "checkpoint"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    base = load_file(str(models["llama"] / "model.safetensors"))
    assert not np.array_equal(a["model.layers.1.self_attn.q_proj.weight"], base["model.layers.1.self_attn.q_proj.weight"])
    assert np.array_equal(a["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])


def test_peft_export_of_a_tiny_adapter_names_tinys_directory(tmp_path, capsys):
    from peft import AutoPeftModelForCausalLM

    from finetune.files.tiny import ensure_tiny

    adapter = random_adapter(ensure_tiny(), tmp_path / "a", keys=("self_attn.q_proj",), num_layers=1)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "model": "tiny"}))
    assert run_cli(capsys, "adapters", "export", adapter, "--output", tmp_path / "peft")[0] == 0
    written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == str(ensure_tiny())
    assert written["layers_to_transform"] == [3] and written["target_modules"] == ["q_proj"]
    model = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "peft").eval()
    assert max_diff(torch_logits(model), mlx_logits(ours("tiny", adapter))) <= 1e-4
