"""`tiny`: a small Llama built deterministically, with a BPE tokenizer trained on bundled data.

A pipeline demo that makes every command work offline on a fresh machine; not a useful model.
Written once to the cache in genuine HF layout (config.json, model.safetensors, tokenizer files),
so transformers can load it too. The same VERSION and SEED give bit-identical files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from finetune.files.datasets import bundled_names, bundled_root
from finetune.files.paths import build_dir, cache_root

VERSION = 3  # 3: weights drawn with NumPy (2: MLX's RNG), so a machine without MLX builds it
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


def init_weights(seed: int = SEED) -> dict[str, np.ndarray]:
    """Every parameter (MLX names, float32) from `seed` alone, with NumPy: no engine is needed to build.

    Matrices and embeddings: normal with std 0.02, one stream per name (`(seed, index)` in sorted
    name order); norm weights: ones; biases: zeros.
    """
    from finetune.core.convert import expected_shapes

    shapes = expected_shapes(CONFIG["model_type"], CONFIG)
    weights = {}
    for i, name in enumerate(sorted(shapes)):
        shape = shapes[name]
        if name.endswith("norm.weight"):
            weights[name] = np.ones(shape, np.float32)
        elif len(shape) == 1:
            weights[name] = np.zeros(shape, np.float32)
        else:
            weights[name] = (0.02 * np.random.default_rng((seed, i)).standard_normal(shape)).astype(np.float32)
    return weights


def _build(out: Path) -> None:
    from safetensors.numpy import save_file

    from finetune.core.convert import mlx_to_hf
    from finetune.files.tokenizer import train_bpe

    train_bpe(
        corpus(),
        out,
        vocab_size=CONFIG["vocab_size"],
        model_max_length=CONFIG["max_position_embeddings"],
    )
    hf = {k: np.ascontiguousarray(v) for k, v in mlx_to_hf(CONFIG["model_type"], CONFIG, init_weights()).items()}
    save_file(hf, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
