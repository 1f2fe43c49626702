"""Model directories in every HF layout the loader reads, built from `hf_models` tiny variants.

Layouts: `safetensors` (one file), `sharded` (shards + index), `bin` (`torch.save` of the state
dict, what transformers 4 wrote with `safe_serialization=False`), `bin-sharded` (bin shards +
`pytorch_model.bin.index.json`). Each directory also gets a real BPE tokenizer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from hf_models import build_hf, save_hf
from transformers import PreTrainedModel

from finetune.files.tokenizer import train_bpe

LAYOUTS = ("safetensors", "sharded", "bin", "bin-sharded")
SHARD_BYTES = 60_000  # splits the tiny variants into several shards


def llama_config(vocab: int) -> dict:
    """The small Llama the CLI and training tests use (2 layers, hidden 64, context 256)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": vocab,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


def tokenizer_files(directory: Path) -> Path:
    """A small byte-level BPE tokenizer in HF layout (vocab about 300)."""
    texts = [f"SELECT name FROM users WHERE id = {i}; hello world {i}" for i in range(50)]
    return train_bpe(texts, directory, vocab_size=300)


def copy_files(source: Path, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.is_file():
            (directory / f.name).write_bytes(f.read_bytes())


def save_bin(model: PreTrainedModel, directory: Path, shard_bytes: int = 0) -> Path:
    """`torch.save` of the state dict (tied tensors share storage), optionally in shards + index."""
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    state = model.state_dict()
    if not shard_bytes:
        torch.save(state, directory / "pytorch_model.bin")
        return directory
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin"
        torch.save(shard, directory / file)
        weight_map |= dict.fromkeys(shard, file)
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    return directory


def write_layout(model: PreTrainedModel, directory: Path, layout: str, tokenizer_dir: Path) -> Path:
    """Save `model` in one of LAYOUTS, with the tokenizer beside it."""
    match layout:
        case "safetensors":
            save_hf(model, directory)
        case "sharded":
            save_hf(model, directory, max_shard_size=f"{SHARD_BYTES // 1000}KB")
        case "bin":
            save_bin(model, directory)
        case "bin-sharded":
            save_bin(model, directory, SHARD_BYTES)
        case _:
            raise ValueError(layout)
    copy_files(tokenizer_dir, directory)
    return directory


def model_dir(variant: str, layout: str, directory: Path, tokenizer_dir: Path):
    """(HF model, its directory in `layout`)."""
    hf = build_hf(variant)
    return hf, write_layout(hf, directory, layout, tokenizer_dir)


def fake_hub_cache(cache: Path, repo: str, source: Path, commit: str = "a" * 40) -> Path:
    """Lay `source`'s files out like huggingface_hub's cache: blobs, a snapshot of symlinks, refs."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(sorted(source.iterdir())):
        blob = root / "blobs" / f"{i:040x}"
        blob.write_bytes(f.read_bytes())
        os.symlink(os.path.relpath(blob, snapshot), snapshot / f.name)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return snapshot


def plus_data(directory: Path, rows: int, valid: int = 2) -> Path:
    """A data folder of `rows` "Q: i plus i?" prompt/completion rows: the last `valid` in valid.jsonl,
    the rest in train.jsonl."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"prompt": f"Q: {i} plus {i}?\nA: ", "completion": str(2 * i)}) + "\n" for i in range(rows)]
    (directory / "train.jsonl").write_text("".join(lines[:rows - valid]))
    (directory / "valid.jsonl").write_text("".join(lines[rows - valid:]))
    return directory
