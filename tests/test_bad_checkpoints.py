"""The bad-checkpoint corpus under both engines: every damaged model directory gets one line
naming the file and what is wrong with it, exit 2, on `--backend mlx` and `--backend torch`
(one checked reader; the torch engine also checks against the model transformers builds)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from model_factory import copy_files, model_dir
from safetensors.numpy import load_file, save_file
from transformers import OPTConfig, OPTForCausalLM

from finetune.cli import main

BACKENDS = ("mlx", "torch")


@pytest.fixture(autouse=True)
def _home(offline_home):
    """A fresh FineTune home (no converted-model cache shared between cases), offline."""


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tok) -> dict[str, Path]:
    """A tiny llama as one safetensors file and as shards + index, each with a tokenizer."""
    root = tmp_path_factory.mktemp("bad-sources")
    return {layout: model_dir("llama", layout, root / layout, tok)[1] for layout in ("safetensors", "sharded")}


class _Evil:
    """A pickle that would create `marker` when loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _edit_config(d: Path, **fields) -> None:
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(config | fields))


def _edit_tensors(f: Path, edit: Callable[[dict], None]) -> None:
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def _retag(f: Path, name: str, dtype: str, factor: int) -> None:
    """Relabel one tensor's dtype in the header (the bytes stay: `factor` elements per float32)."""
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header[name] = header[name] | {"dtype": dtype, "shape": [header[name]["shape"][0] * factor]}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    f.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])


def _shards(d: Path) -> list[Path]:
    return sorted(d.glob("model-*-of-*.safetensors"))


def _evil_bin(d: Path) -> None:
    (d / "model.safetensors").unlink()
    evil = pickle.dumps({"model.embed_tokens.weight": _Evil(d / "PWNED")}, protocol=2)
    with zipfile.ZipFile(d / "pytorch_model.bin", "w") as z:
        z.writestr("archive/data.pkl", evil)
        z.writestr("archive/version", "3\n")


def _drop_from_shard(d: Path) -> None:
    _edit_tensors(_shards(d)[0], lambda t: t.pop(sorted(t)[0]))


def _dropped_name(d: Path) -> str:
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    return sorted(k for k, v in index.items() if v == _shards(d)[0].name)[0]


# case -> (layout, damage, the file it names ("": the model directory), what both engines' lines
# say, what each engine's line says)
CASES: dict[str, tuple[str, Callable[[Path], None], str, tuple[str, ...], dict[str, tuple[str, ...]]]] = {
    "truncated": ("safetensors", lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:50_000]),
                  "model.safetensors", ("truncated",), {}),
    "garbage": ("safetensors", lambda d: (d / "model.safetensors").write_bytes(os.urandom(5000)),
                "model.safetensors", ("not a safetensors file, or truncated",), {}),
    "missing tensor": ("safetensors", lambda d: _edit_tensors(d / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.down_proj.weight")),
                       "model.safetensors", ("missing", "model.layers.1.mlp.down_proj.weight"),
                       {"mlx": ("llama checkpoint does not match its config",), "torch": ("that llama (LlamaForCausalLM",)}),
    "shape mismatch": ("safetensors", lambda d: _edit_config(d, intermediate_size=96), "model.safetensors", ("96",),
                       {"mlx": ("shape mismatch for model.layers.0.mlp.gate_proj.weight: expected (96, 64), got (128, 64)",),
                        "torch": ("tensor model.layers.0.mlp.down_proj.weight has shape (64, 128), but config.json (llama) implies (64, 96)",)}),
    "pickle that runs code": ("safetensors", _evil_bin, "pytorch_model.bin", ("refused: refusing to load posix.system",), {}),
    "index not json": ("sharded", lambda d: (d / "model.safetensors.index.json").write_text("{not json"),
                       "model.safetensors.index.json", ("unreadable shard index",), {}),
    "index outside the directory": ("sharded", lambda d: (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "../model.safetensors"}})),
        "model.safetensors.index.json", ("weight_map must map tensor names to file names in the same directory",), {}),
    "index names a missing shard": ("sharded", lambda d: _shards(d)[-1].unlink(), "model.safetensors.index.json",
                                    ("which is missing from",), {}),
    "shard holds a tensor the index lacks": ("sharded", lambda d: _edit_tensors(
        _shards(d)[0], lambda t: t.update({"model.layers.0.extra.weight": np.zeros(4, np.float32)})),
        "model-00001-of-", ("holds tensor model.layers.0.extra.weight, which model.safetensors.index.json does not list",), {}),
    "tensor in two shards": ("sharded", lambda d: _edit_tensors(_shards(d)[0], lambda t: t.update(
        {k: v for k, v in load_file(_shards(d)[1]).items()})), "model-00002-of-", ("is also in model-00001-of-",), {}),
    "index lists a tensor no shard holds": ("sharded", _drop_from_shard, "model.safetensors.index.json",
                                            ("lists tensors no shard holds",), {}),
    "unsupported model_type": ("safetensors", lambda d: _edit_config(d, model_type="mamba", architectures=["MambaForCausalLM"]),
                               "", ("mamba",),
                               {"mlx": ("architecture 'mamba' is not implemented by the MLX engine (", "llama"),
                                "torch": ("model.safetensors: missing", "that mamba (MambaForCausalLM, built from config.json) needs")}),
    "model_type nobody knows": ("safetensors", lambda d: _edit_config(d, model_type="llama9000"), "", ("llama9000",),
                                {"mlx": ("is not implemented by the MLX engine",),
                                 "torch": ("config.json: transformers", "does not recognize this architecture")}),
    "dtype neither engine reads": ("safetensors", lambda d: _retag(d / "model.safetensors", "model.norm.weight", "F8_E4M3", 4),
                                   "model.safetensors", ("tensor model.norm.weight is stored as F8_E4M3, which FineTune does not read",), {}),
    "integer weights": ("safetensors", lambda d: _edit_tensors(d / "model.safetensors", lambda t: t.update(
        {"model.norm.weight": t["model.norm.weight"].astype(np.int32)})),
        "model.safetensors", ("tensor model.norm.weight is stored as int32; a float checkpoint's weights are floating point",), {}),
}


def _generate(capfd, directory: Path, backend: str) -> tuple[int, str]:
    """`ft generate` in process: the exit code and the one line besides the backend line."""
    capfd.readouterr()
    code = main(["generate", str(directory), "--prompt", "hi", "--max-tokens", "2", "--backend", backend])
    err = capfd.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if not line.startswith("backend: ")]
    assert len(lines) == 1, err
    return code, lines[0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_bad_checkpoint_is_one_line_naming_the_file(sources, tmp_path, capfd, case, backend):
    layout, damage, names, both, each = CASES[case]
    directory = tmp_path / "model"
    copy_files(sources[layout], directory)
    damage(directory)
    code, line = _generate(capfd, directory, backend)
    assert code == 2, line
    assert line.startswith(f"ft: error: {directory}/{names}" if names else f"ft: error: {directory}"), line
    for text in (*both, *each.get(backend, ())):
        assert text in line, line
    if case == "index lists a tensor no shard holds":
        assert _dropped_name(directory) in line
    assert not (directory / "PWNED").exists()


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_undamaged_sources_generate(sources, capfd, backend):
    for directory in sources.values():
        capfd.readouterr()
        assert main(["generate", str(directory), "--prompt", "hi", "--max-tokens", "2", "--backend", backend]) == 0


@pytest.fixture(scope="module")
def opt(tmp_path_factory, tok) -> Path:
    """A tiny OPT (no MLX row: the torch engine alone takes it) saved by transformers."""
    out = tmp_path_factory.mktemp("opt") / "model"
    torch.manual_seed(0)
    config = OPTConfig(vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                       word_embed_proj_dim=32, max_position_embeddings=64)
    OPTForCausalLM(config).save_pretrained(out)
    copy_files(tok, out)
    return out


def test_torch_refuses_a_missing_tensor_outside_the_registry(opt, tmp_path, capfd):
    code, line = _generate(capfd, opt, "torch")
    assert code == 0 and "tokens/s" in line, line
    directory = tmp_path / "opt"
    copy_files(opt, directory)
    _edit_tensors(directory / "model.safetensors", lambda t: t.pop("model.decoder.layers.1.fc2.weight"))
    code, line = _generate(capfd, directory, "torch")
    assert code == 2
    assert line == (f"ft: error: {directory}/model.safetensors: missing 1 tensor(s) that opt (OPTForCausalLM, built "
                    "from config.json) needs: model.decoder.layers.1.fc2.weight")


def test_torch_refuses_a_misshapen_tensor_outside_the_registry(opt, tmp_path, capfd):
    directory = tmp_path / "opt"
    copy_files(opt, directory)
    _edit_config(directory, ffn_dim=48)
    code, line = _generate(capfd, directory, "torch")
    assert code == 2
    assert line == (f"ft: error: {directory}/model.safetensors: tensor model.decoder.layers.0.fc1.bias has shape "
                    "(64,), but config.json (opt) implies (48,)")


def test_nothing_else_reaches_the_terminal(sources, tmp_path):
    """As a user runs it (a subprocess: transformers' own log lines go to the real stderr)."""
    directory = tmp_path / "model"
    copy_files(sources["safetensors"], directory)
    _edit_config(directory, model_type="llama9000")
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}  # set by importing our tokenizer module
    env["FT_BACKEND"] = "torch"
    done = subprocess.run([sys.executable, "-m", "finetune.cli", "generate", str(directory), "--prompt", "hi"],
                          capture_output=True, text=True, env=env, timeout=300)
    lines = [line for line in done.stderr.splitlines() if not line.startswith("backend: ")]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith(f"ft: error: {directory}/config.json: transformers"), lines
