"""`load_model` / `finetune.load` on every checkpoint layout, and every error a user can meet."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from hf_models import build_hf
from model_factory import LAYOUTS, copy_files, fake_hub_cache, model_dir
from returns.result import Failure, Success

import finetune
from finetune.cli import main
from finetune.engines.mlx.load import load_model
from finetune.errors import UserError
from finetune.files.torchbin import read_torch_bin
from finetune.files.weights import read_checkpoint

TOL = 1e-4


@pytest.fixture(autouse=True)
def _home(offline_home):
    """Every test here gets its own FineTune home and an empty, offline HF cache."""


@pytest.fixture(scope="module")
def llama(tmp_path_factory, tok):
    """(HF llama, its single-file directory), for the error tests to copy and damage."""
    return model_dir("llama", "safetensors", tmp_path_factory.mktemp("llama") / "m", tok)


def logits_of(hf, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids)).logits.numpy()


def failure(result) -> str:
    assert isinstance(result, Failure), result
    message = result.failure()
    assert "\n" not in message
    return message


def cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", ["llama", "qwen2-tied", "gpt2"])
def test_every_layout_gives_transformers_logits(tmp_path, tok, layout, variant):
    hf, directory = model_dir(variant, layout, tmp_path / "m", tok)
    model, tokenizer = load_model(str(directory)).unwrap()
    ids = np.random.default_rng(0).integers(0, 256, size=(2, 12))
    ours = np.array(model(mx.array(ids)))
    assert ours.shape == (2, 12, 256)
    assert np.abs(ours - logits_of(hf, ids)).max() <= TOL
    assert model.training is False
    assert tokenizer("hello")["input_ids"]


def test_sharded_layouts_really_are_sharded(tmp_path, tok):
    _, st = model_dir("llama", "sharded", tmp_path / "a", tok)
    _, pt = model_dir("llama", "bin-sharded", tmp_path / "b", tok)
    assert len(list(st.glob("model-*-of-*.safetensors"))) > 1
    assert len(list(pt.glob("pytorch_model-*-of-*.bin"))) > 1
    assert not list(pt.glob("*.safetensors"))


def test_public_load_returns_model_and_tokenizer(llama):
    hf, directory = llama
    model, tokenizer = finetune.load(str(directory))
    ids = np.arange(10)[None] % 256
    assert np.abs(np.array(model(mx.array(ids))) - logits_of(hf, ids)).max() <= TOL
    assert tokenizer.decode(tokenizer("hello world")["input_ids"], skip_special_tokens=True) == (
        "hello world"
    )


def test_dtypes_auto_is_float32_on_cpu_and_explicit_ones_are_honoured(tmp_path, tok):
    hf = build_hf("llama").to(torch.bfloat16)
    from model_factory import write_layout

    directory = write_layout(hf, tmp_path / "bf16", "safetensors", tok)
    auto, _ = load_model(str(directory)).unwrap()
    half, _ = load_model(str(directory), dtype="float16").unwrap()
    bf16, _ = load_model(str(directory), dtype="bfloat16").unwrap()
    assert auto.model.embed_tokens.weight.dtype == mx.float32  # this machine has no GPU
    assert half.model.layers[0].self_attn.q_proj.weight.dtype == mx.float16
    assert bf16.lm_head.weight.dtype == mx.bfloat16
    assert "dtype 'int8' is not one of" in failure(load_model(str(directory), dtype="int8"))


def test_bfloat16_bin_reads_bit_identical_to_safetensors(tmp_path, tok):
    hf = build_hf("gpt2").to(torch.bfloat16)
    from model_factory import write_layout

    a = read_checkpoint(write_layout(hf, tmp_path / "st", "safetensors", tok)).unwrap()
    b = read_checkpoint(write_layout(hf, tmp_path / "pt", "bin", tok)).unwrap()
    assert b["transformer.h.0.attn.c_attn.weight"].dtype == mx.bfloat16
    for k in a:
        assert mx.array_equal(a[k], b[k]).item(), k


def test_bin_views_offsets_and_shared_storage_are_rebuilt(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {
        "whole": base,
        "transposed": base.t(),
        "row": base[2],
        "strided": base[1:, ::2],
        "half": torch.arange(5, dtype=torch.float16),
        "long": torch.tensor([1, -2, 3]),
        "flag": torch.tensor([True, False]),
        "scalar": torch.tensor(7.5),
    }
    torch.save(state, tmp_path / "x.bin")
    got = read_torch_bin(tmp_path / "x.bin").unwrap()
    assert got.keys() == state.keys()
    for k, v in state.items():
        assert got[k].shape == tuple(v.shape), k
        assert np.array_equal(np.array(got[k]), v.numpy()), k


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _torch_zip(path: Path, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
    return path


def test_malicious_pickles_are_refused_without_running(tmp_path, tok, llama):
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"model.embed_tokens.weight": _Evil(marker)}, protocol=2)
    zipped = _torch_zip(tmp_path / "zipped.bin", evil)
    message = failure(read_torch_bin(zipped))
    assert "refused: refusing to load posix.system" in message
    plain = tmp_path / "plain.bin"
    plain.write_bytes(evil)  # the legacy (non-zip) container is not read at all
    assert "not a zip-format torch checkpoint" in failure(read_torch_bin(plain))
    builtins = pickle.dumps(eval, protocol=4)  # a bare global: builtins.eval
    assert "refusing to load builtins.eval" in failure(
        read_torch_bin(_torch_zip(tmp_path / "b.bin", builtins))
    )
    # Through the loader and the CLI: a model dir whose only weights are the evil .bin.
    directory = tmp_path / "evil-model"
    copy_files(llama[1], directory)
    (directory / "model.safetensors").unlink()
    (directory / "pytorch_model.bin").write_bytes(zipped.read_bytes())
    assert "refusing to load posix.system" in failure(load_model(str(directory)))
    assert not marker.exists()


def test_storage_records_that_reach_past_their_data_are_refused(tmp_path):
    torch.save({"w": torch.zeros(4)}, tmp_path / "ok.bin")
    with zipfile.ZipFile(tmp_path / "ok.bin") as z:
        names = {n: z.read(n) for n in z.namelist()}
    pkl = next(n for n in names if n.endswith("data.pkl"))
    # size (4,) -> (400,): the tensor would read 396 floats of someone else's memory.
    names[pkl] = names[pkl].replace(b"K\x04\x85", b"M\x90\x01\x85")
    with zipfile.ZipFile(tmp_path / "bad.bin", "w") as z:
        for n, data in names.items():
            z.writestr(n, data)
    assert "reaches past its storage" in failure(read_torch_bin(tmp_path / "bad.bin"))


def _damaged(llama, tmp_path: Path, name: str = "m") -> Path:
    directory = tmp_path / name
    copy_files(llama[1], directory)
    return directory


def test_missing_path_and_not_a_model_dir(tmp_path, capsys):
    assert "no such model directory" in failure(load_model(str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    assert "not a model directory (no config.json)" in failure(load_model(str(tmp_path / "empty")))
    code, err = cli(["models", "info", str(tmp_path / "nope")], capsys)
    assert code == 2 and err.startswith("ft: error: ") and "no such model directory" in err


def test_uncached_hub_id_offline_is_one_clear_line(capsys):
    message = failure(load_model("someone/not-downloaded"))
    assert message.startswith("someone/not-downloaded: not in the local HuggingFace cache")
    assert "HF_HUB_OFFLINE" in message and "hf download someone/not-downloaded" in message
    code, err = cli(["models", "info", "someone/not-downloaded"], capsys)
    assert code == 2 and "not in the local HuggingFace cache" in err


def test_fake_hf_cache_resolves_offline(tmp_path, llama, capsys):
    hf, directory = llama
    fake_hub_cache(tmp_path / "hub", "org/tiny-llama", directory)
    model, _ = load_model("org/tiny-llama").unwrap()
    ids = np.arange(12)[None]
    assert np.abs(np.array(model(mx.array(ids))) - logits_of(hf, ids)).max() <= TOL
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "org/tiny-llama" in out and "hf-cache" in out


def test_unsupported_architecture_names_the_supported_ones(tmp_path, llama, capsys):
    directory = _damaged(llama, tmp_path)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | {"model_type": "bert"}))
    message = failure(load_model(str(directory)))
    assert "unsupported architecture 'bert'; supported: llama, mistral, qwen2, qwen3, " in message
    code, err = cli(["models", "info", str(directory)], capsys)
    assert code == 2 and "architecture 'bert' is not implemented by the MLX engine" in err and "--backend torch" in err


def test_remote_code_models_are_refused(tmp_path, llama, capsys):
    directory = _damaged(llama, tmp_path)
    config = json.loads((directory / "config.json").read_text())
    auto_map = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (directory / "config.json").write_text(json.dumps(config | {"auto_map": auto_map}))
    assert "never runs remote code" in failure(load_model(str(directory)))
    code, err = cli(["models", "info", str(directory)], capsys)
    assert code == 2 and "never runs remote code" in err


def test_missing_shard_is_named(tmp_path, tok, capsys):
    _, directory = model_dir("llama", "sharded", tmp_path / "m", tok)
    shards = sorted(directory.glob("model-*-of-*.safetensors"))
    shards[-1].unlink()
    message = failure(load_model(str(directory)))
    assert f"names {shards[-1].name}, which is missing" in message
    code, err = cli(["models", "info", str(directory), "--load"], capsys)
    assert code == 2 and "which is missing" in err


def test_missing_bin_shard_is_named(tmp_path, tok):
    _, directory = model_dir("gpt2", "bin-sharded", tmp_path / "m", tok)
    shard = sorted(directory.glob("pytorch_model-*.bin"))[0]
    shard.unlink()
    assert f"names {shard.name}, which is missing" in failure(load_model(str(directory)))


def test_truncated_safetensors_names_the_file(tmp_path, llama, capsys):
    directory = _damaged(llama, tmp_path)
    f = directory / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    message = failure(load_model(str(directory)))
    assert str(f) in message and "truncated" in message
    code, err = cli(["models", "info", str(directory), "--load"], capsys)
    assert code == 2 and err.startswith("ft: error: ") and "truncated" in err


@pytest.mark.parametrize(
    "garbage", [b"\x00" * 3, os.urandom(5000), b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all"]
)
def test_garbage_safetensors_names_the_file(tmp_path, llama, garbage):
    directory = _damaged(llama, tmp_path)
    (directory / "model.safetensors").write_bytes(garbage)
    message = failure(load_model(str(directory)))
    assert str(directory / "model.safetensors") in message
    assert "not a safetensors file" in message or "corrupt safetensors header" in message


def test_garbage_bin_is_a_corrupt_checkpoint(tmp_path, tok):
    _, directory = model_dir("llama", "bin", tmp_path / "m", tok)
    f = directory / "pytorch_model.bin"
    f.write_bytes(f.read_bytes()[:2000])
    assert str(f) in failure(load_model(str(directory)))


def test_config_weight_shape_mismatch(tmp_path, llama, capsys):
    directory = _damaged(llama, tmp_path)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | {"vocab_size": 300}))
    message = failure(load_model(str(directory)))
    assert (
        "shape mismatch for model.embed_tokens.weight: expected (300, 64), got (256, 64)" in message
    )
    code, err = cli(["models", "info", str(directory), "--load"], capsys)
    assert code == 2 and "shape mismatch" in err


def test_no_weights_at_all(tmp_path, llama, capsys):
    directory = _damaged(llama, tmp_path)
    (directory / "model.safetensors").unlink()
    message = failure(load_model(str(directory)))
    assert "no weights found" in message and "model.safetensors" in message
    with pytest.raises(UserError, match="no weights found"):
        finetune.load(str(directory))
    code, err = cli(["models", "info", str(directory), "--load"], capsys)
    assert code == 2 and "no weights found" in err


def test_results_are_values_not_exceptions(llama):
    assert isinstance(load_model(str(llama[1])), Success)
    assert isinstance(load_model("/definitely/not/here"), Failure)


def test_safetensors_are_preferred_over_bin(tmp_path, tok, llama):
    """With both present, the .bin is never read (here it is garbage)."""
    directory = _damaged(llama, tmp_path)
    (directory / "pytorch_model.bin").write_bytes(b"garbage")
    assert isinstance(load_model(str(directory)), Success)


def test_config_features_we_do_not_implement_are_one_line(tmp_path, llama):
    directory = _damaged(llama, tmp_path)
    config = json.loads((directory / "config.json").read_text())
    unknown = {"rope_type": "proportional", "factor": 2.0, "rope_theta": 10000.0}
    (directory / "config.json").write_text(json.dumps(config | {"rope_parameters": unknown}))
    assert "rope type 'proportional' is not supported" in failure(load_model(str(directory)))
    del config["num_attention_heads"]
    (directory / "config.json").write_text(json.dumps(config))
    assert "config.json lacks field 'num_attention_heads'" in failure(load_model(str(directory)))


def test_import_finetune_stays_light():
    code = "import sys, finetune; assert 'mlx' not in sys.modules; assert callable(finetune.load)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_tokenizer_is_one_line(tmp_path, llama):
    directory = tmp_path / "m"
    directory.mkdir()
    for name in ("config.json", "model.safetensors"):
        (directory / name).write_bytes((llama[1] / name).read_bytes())
    assert "no tokenizer files in" in failure(load_model(str(directory)))
    (directory / "tokenizer.json").write_text("{not json")
    assert "cannot load the tokenizer" in failure(load_model(str(directory)))
