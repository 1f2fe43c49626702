"""The converted-model cache: saved on first load, served later, invalidated when the source changes."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from hf_models import build_hf
from mlx.utils import tree_flatten
from model_factory import fake_hub_cache, model_dir, write_layout

from finetune.cli import main
from finetune.engines.mlx.load import load_model
from finetune.files import manager


@pytest.fixture(autouse=True)
def _home(offline_home):
    """Every test here gets its own FineTune home and an empty, offline HF cache."""


def params(model) -> dict[str, mx.array]:
    return dict(tree_flatten(model.parameters()))


def same(a, b) -> bool:
    pa, pb = params(a), params(b)
    return pa.keys() == pb.keys() and all(
        pa[k].dtype == pb[k].dtype and mx.array_equal(pa[k], pb[k]).item() for k in pa
    )


def logits_match(model, hf) -> bool:
    ids = np.arange(16)[None]
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(ids)).logits.numpy()
    return np.abs(np.array(model(mx.array(ids))) - theirs).max() <= 1e-4


def spoil_keeping_stat(path: Path) -> None:
    """Garbage of the same size with the old mtime: only a cache can still serve this source."""
    st = path.stat()
    path.write_bytes(b"\xff" * st.st_size)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def only_entry() -> tuple[Path, manager.Manifest]:
    found = manager.entries()
    assert len(found) == 1, found
    return found[0]


def bf16_dir(variant: str, directory: Path, tok: Path, seed: int = 0):
    """A bfloat16 safetensors checkpoint: loading it as float32 (auto on CPU) casts every tensor."""
    ref = build_hf(variant, seed)  # float32 reference holding the bfloat16-rounded weights
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    write_layout(copy.deepcopy(ref).to(torch.bfloat16), directory, "safetensors", tok)
    return ref, directory  # (casting `ref` itself would round its RoPE buffer too)


@pytest.mark.parametrize("layout", ["bf16-safetensors", "bin-sharded"])
def test_second_load_is_served_from_the_cache(tmp_path, tok, layout):
    if layout == "bin-sharded":
        hf, directory = model_dir("llama", layout, tmp_path / "m", tok)
    else:
        hf, directory = bf16_dir("llama", tmp_path / "m", tok)
    first, _ = load_model(str(directory)).unwrap()
    entry, manifest = only_entry()
    assert (entry / "model.safetensors").is_file() and (entry / "manifest.json").is_file()
    assert manifest.source == str(directory.resolve()) and manifest.dtype == "float32"
    assert manifest.model_type == "llama"
    assert manifest.parameters == sum(v.size for v in params(first).values())
    assert "config.json" in manifest.files
    for f in directory.glob("*.bin" if layout == "bin-sharded" else "*.safetensors"):
        spoil_keeping_stat(f)
    second, _ = load_model(str(directory)).unwrap()
    assert same(first, second) and logits_match(second, hf)
    assert len(manager.entries()) == 1


def test_spoiled_source_without_cache_fails(tmp_path, tok):
    """Guards the test above: the spoiled source really is unreadable on its own."""
    _, directory = bf16_dir("llama", tmp_path / "m", tok)
    spoil_keeping_stat(directory / "model.safetensors")
    assert "model.safetensors" in load_model(str(directory), cache=False).failure()


def test_safetensors_already_in_the_dtype_get_no_entry(tmp_path, tok):
    """Nothing to gain: the cached copy would load no faster than the source itself."""
    hf, directory = model_dir("llama", "safetensors", tmp_path / "m", tok)
    model, _ = load_model(str(directory)).unwrap()
    assert logits_match(model, hf) and manager.entries() == []


def test_changed_source_is_converted_again(tmp_path, tok, capsys):
    _, directory = bf16_dir("llama", tmp_path / "m", tok)
    load_model(str(directory)).unwrap()
    old_files = only_entry()[1].files
    other, _ = bf16_dir("llama", directory, tok, seed=1)
    assert not manager.is_fresh(only_entry()[1])
    assert main(["models", "list"]) == 0
    assert "stale" in capsys.readouterr().out
    model, _ = load_model(str(directory)).unwrap()
    assert logits_match(model, other)
    entry, manifest = only_entry()
    assert manifest.files != old_files and manager.is_fresh(manifest)


def test_each_dtype_has_its_own_entry(tmp_path, tok):
    _, directory = model_dir("gpt2", "safetensors", tmp_path / "m", tok)
    a, _ = load_model(str(directory), dtype="bfloat16").unwrap()
    b, _ = load_model(str(directory), dtype="float16").unwrap()
    assert sorted(m.dtype for _, m in manager.entries()) == ["bfloat16", "float16"]
    assert params(b)["transformer.h.0.attn.c_attn.weight"].dtype == mx.float16
    again, _ = load_model(str(directory), dtype="float16").unwrap()
    assert same(b, again) and not same(a, b)


def test_a_damaged_cache_entry_is_rebuilt(tmp_path, tok):
    hf, directory = model_dir("qwen2", "bin", tmp_path / "m", tok)
    load_model(str(directory)).unwrap()
    entry, _ = only_entry()
    (entry / "model.safetensors").write_bytes(b"junk")
    model, _ = load_model(str(directory)).unwrap()
    assert logits_match(model, hf)
    assert (entry / "model.safetensors").stat().st_size > 1000


def test_uncached_load_leaves_no_entry(tmp_path, tok):
    _, directory = model_dir("llama", "bin", tmp_path / "m", tok)
    load_model(str(directory), cache=False).unwrap()
    assert manager.entries() == []


def test_hub_models_are_named_by_id_and_listed(tmp_path, tok, capsys):
    _, source = bf16_dir("llama", tmp_path / "src", tok)
    fake_hub_cache(tmp_path / "hub", "org/cached-llama", source)
    assert main(["models", "info", "org/cached-llama", "--load"]) == 0
    out = capsys.readouterr().out
    assert "loaded in" in out and "converted cache" in out
    entry, manifest = only_entry()
    assert manifest.source == "org/cached-llama" and entry.name.startswith("org--cached-llama-")
    assert str(entry) in out
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert out.count("org/cached-llama") == 2  # the converted entry and the HF-cache snapshot
    assert "converted" in out and "hf-cache" in out
