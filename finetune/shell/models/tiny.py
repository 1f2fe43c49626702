"""`tiny`: a small Llama built deterministically, with a BPE tokenizer trained on bundled data.

A pipeline demo that makes every command work offline on a fresh machine; not a useful model.
Written once to the cache in genuine HF layout (config.json, model.safetensors, tokenizer files),
so transformers can load it too. The same VERSION and SEED give bit-identical files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.shell.data.datasets import bundled_names, bundled_root
from finetune.shell.paths import build_dir, cache_root

if TYPE_CHECKING:  # MLX is imported where it is used: these modules also serve the torch engine
    import mlx.core as mx

VERSION = 2
SEED = 1234
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 2048,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 2,
    "torch_dtype": "float32",
    "_finetune_note": "FineTune's built-in 'tiny' pipeline demo: random weights from a fixed "
    "seed, not a useful language model.",
}


def tiny_dir() -> Path:
    return cache_root() / "models" / f"tiny-v{VERSION}"


def ensure_tiny() -> Path:
    """The tiny model's directory, built once (atomically) on first use."""
    final = tiny_dir()
    if (final / "config.json").is_file():
        return final
    return build_dir(final, _build)


def corpus() -> list[str]:
    """Every string of the bundled training splits, in a fixed order."""
    texts: list[str] = []
    for name in bundled_names():
        path = bundled_root() / name / "train.jsonl"
        for line in path.read_text(encoding="utf-8").splitlines():
            texts += [s for s in _strings(json.loads(line)) if s]
    return texts


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def init_weights(seed: int = SEED) -> dict[str, mx.array]:
    """Every parameter of `build(CONFIG)` from one explicit key, split per name in sorted order.

    Matrices and embeddings: normal with std 0.02; norm weights: ones; biases: zeros.
    """
    import mlx.core as mx  # only to build: a built tiny serves the torch engine without MLX
    from mlx.utils import tree_flatten

    from finetune.models import build

    params = dict(tree_flatten(build(CONFIG).parameters()))
    names = sorted(params)
    keys = mx.random.split(mx.random.key(seed), len(names))
    weights = {}
    for i, name in enumerate(names):
        shape, dtype = params[name].shape, mx.float32
        if name.endswith("norm.weight"):
            weights[name] = mx.ones(shape, dtype)
        elif params[name].ndim == 1:
            weights[name] = mx.zeros(shape, dtype)
        else:
            weights[name] = 0.02 * mx.random.normal(shape, dtype, key=keys[i])
    mx.eval(weights)
    return weights


def _build(out: Path) -> None:
    import mlx.core as mx

    from finetune.core.convert import mlx_to_hf
    from finetune.shell.models.tokenizer import train_bpe

    train_bpe(
        corpus(),
        out,
        vocab_size=CONFIG["vocab_size"],
        model_max_length=CONFIG["max_position_embeddings"],
    )
    hf = mlx_to_hf(CONFIG["model_type"], CONFIG, init_weights())
    mx.save_safetensors(str(out / "model.safetensors"), hf, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
