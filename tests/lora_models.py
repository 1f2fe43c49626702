"""Tiny HF models with matching tokenizers, and LoRA adapters with random non-zero `lora_b`,
for the fuse / PEFT / adapters tests."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import torch
from cli_run import error_line as one_line_error  # noqa: F401 (re-exported for the adapter tests)
from cli_run import run_cli  # noqa: F401
from hf_models import _CLASSES, tiny_config
from model_factory import copy_files, tokenizer_files
from transformers import PreTrainedModel

from finetune.core import lora
from finetune.core.adapters import AdapterSpec
from finetune.engines.mlx import lora as lora_modules
from finetune.engines.mlx.lora import model_kind
from finetune.engines.mlx.model import build
from finetune.files.tokenizer import load_tokenizer
from finetune.shell.export import adapters

# Token rows of several lengths (ids below every test vocab).
ROWS = ([3, 17, 5, 42, 9, 11, 250, 7], [1, 2, 3], [200, 100, 50, 25, 12, 6, 3, 1, 0, 99, 98, 97])


def make_tokenizer(directory: Path) -> tuple[Path, int]:
    path = tokenizer_files(directory)
    return path, len(load_tokenizer(path))


def build_hf(variant: str, vocab: int, seed: int = 0, away_from_zero: float = 0.0) -> PreTrainedModel:
    """A float32 HF model of a `hf_models` variant with `vocab` tokens, order-one weights.

    `away_from_zero`: block linear weights get at least this magnitude (so a small update
    cannot move them by a rounding step in half precision).
    """
    config = tiny_config(variant)
    config.vocab_size = vocab
    torch.manual_seed(seed)
    model = _CLASSES[config.model_type](config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".weight") and ("norm" in name or ".ln_" in name):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
                if away_from_zero and p.ndim == 2 and (".layers." in name or ".h." in name):
                    p.copy_(torch.sign(p) * (away_from_zero + 0.1 * p.abs()))
    return model


def write_model(model: PreTrainedModel, directory: Path, tokenizer_dir: Path) -> Path:
    model.save_pretrained(directory)
    copy_files(tokenizer_dir, directory)
    return directory


def random_adapter(
    model_dir: Path, out: Path, *, rank: int = 4, scale: float = 2.0, b_std: float = 0.1,
    keys: tuple[str, ...] | None = None, num_layers: int = -1, seed: int = 1,
) -> Path:
    """An mlx-lm format adapter on `model_dir` whose `lora_b` are random (so it changes logits)."""
    config = json.loads((model_dir / "config.json").read_text())
    model = build(config)
    block = lora_modules.block_linears(model)
    keys = keys or block
    layers = lora.select_layers(len(model.layers), num_layers)
    shapes = lora_modules.linear_shapes(model, lora.targets(lora_modules.layers_prefix(model), layers, keys))
    params = {k: mx.array(v) for k, v in lora.init(seed, shapes, rank).items()}
    rng = np.random.default_rng(seed)
    params = {
        k: mx.array((b_std * rng.standard_normal(v.shape)).astype(np.float32)) if k.endswith(".lora_b") else v
        for k, v in params.items()
    }
    spec = AdapterSpec(rank=rank, scale=scale, keys=keys, num_layers=num_layers, model=str(model_dir))
    adapters.save(out, params, spec, model_kind(model))
    return out


def bases_with_adapters(root: Path, tok: tuple[Path, int], variants: tuple[str, ...]) -> dict[str, tuple[Path, Path]]:
    """Each variant's float32 base under `root` and an all-linear `random_adapter` on it (rank 4, scale 2)."""
    out = {}
    for variant in variants:
        d = write_model(build_hf(variant, tok[1]), root / variant, tok[0])
        out[variant] = (d, random_adapter(d, root / f"{variant}-adapter"))
    return out


def ours(model_dir: Path, adapter: Path | None = None):
    import finetune

    return finetune.load(str(model_dir), adapter=None if adapter is None else str(adapter))[0]


def mlx_logits(model, rows=ROWS) -> list[np.ndarray]:
    return [np.array(model(mx.array([r]))[0].astype(mx.float32)) for r in rows]


def torch_logits(model, rows=ROWS) -> list[np.ndarray]:
    with torch.no_grad():
        return [model(torch.tensor([r])).logits[0].float().numpy() for r in rows]


def max_diff(xs: list[np.ndarray], ys: list[np.ndarray]) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(xs, ys, strict=True))


def reverse_rows(n: int, offset: int = 0) -> list[dict]:
    """`n` prompt/completion rows asking to reverse a few letters (a task a tiny model learns)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    out = []
    for i in range(offset, offset + n):
        text = "".join(letters[(7 * i + 5 * k) % 26] for k in range(3 + i % 3))
        out.append({"prompt": f"Q: reverse {text}\nA: ", "completion": text[::-1]})
    return out
