"""Our MLX modules against transformers on tiny random checkpoints saved in real HF layout."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from hf_models import VARIANTS, build_hf, save_hf
from returns.result import Failure, Success

from finetune.core.convert import expected_shapes, hf_to_mlx, mlx_to_hf
from finetune.engines.mlx.model import build
from finetune.files.weights import read_checkpoint

TOL = 1e-4
VOCAB = 256


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """variant -> (HF model, directory it was saved to), built once per module."""
    cache: dict[str, tuple] = {}

    def get(variant: str):
        if variant not in cache:
            hf = build_hf(variant)
            cache[variant] = (hf, save_hf(hf, tmp_path_factory.mktemp(variant)))
        return cache[variant]

    return get


def load_ours(directory: Path):
    """config.json + safetensors -> converted weights -> our model, strictly loaded."""
    config = json.loads((directory / "config.json").read_text())
    weights = hf_to_mlx(config["model_type"], config, read_checkpoint(directory).unwrap()).unwrap()
    return build(config).load_weights(list(weights.items()), strict=True)


def hf_logits(hf, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        attn = None if mask is None else torch.tensor(mask)
        return hf(input_ids=torch.tensor(ids), attention_mask=attn).logits.numpy()


def random_ids(batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(batch, length))


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers(saved, variant):
    hf, directory = saved(variant)
    ids = random_ids(2, 20)  # longer than mistral's window of 8
    ours = np.array(load_ours(directory)(mx.array(ids)))
    assert np.abs(ours - hf_logits(hf, ids)).max() <= TOL


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers_with_padding(saved, variant):
    hf, directory = saved(variant)
    ids = random_ids(3, 14, seed=1)
    mask = np.ones_like(ids)
    mask[0, 10:] = 0  # right padding
    mask[1, :5] = 0  # left padding
    ours = np.array(load_ours(directory)(mx.array(ids), mask=mx.array(mask)))
    real = mask.astype(bool)
    assert np.abs(ours[real] - hf_logits(hf, ids, mask)[real]).max() <= TOL


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_decoding_matches_full_forward(saved, variant):
    model = load_ours(saved(variant)[1])
    ids = mx.array(random_ids(2, 13, seed=2))
    full = model(ids)
    cache = model.make_cache()
    steps = [model(ids[:, :5], cache=cache)]  # prefill, then one token at a time
    steps += [model(ids[:, t : t + 1], cache=cache) for t in range(5, 13)]
    assert cache[0].offset == 13
    assert mx.abs(mx.concatenate(steps, axis=1) - full).max().item() <= TOL


@pytest.mark.parametrize("variant", ["llama", "mistral", "gpt2"])
def test_kv_cache_with_left_padding_matches_full_forward(saved, variant):
    model = load_ours(saved(variant)[1])
    ids = mx.array(random_ids(2, 12, seed=3))
    mask = mx.array([[0, 0, 0] + [1] * 9, [1] * 12])
    full = model(ids, mask=mask)
    cache = model.make_cache()
    steps = [model(ids[:, :6], mask=mask[:, :6], cache=cache)]
    steps += [model(ids[:, t : t + 1], mask=mask[:, : t + 1], cache=cache) for t in range(6, 12)]
    got = mx.concatenate(steps, axis=1)
    assert mx.abs(got[0, 3:] - full[0, 3:]).max().item() <= TOL
    assert mx.abs(got[1] - full[1]).max().item() <= TOL


@pytest.mark.parametrize("variant", ["llama", "gpt2-untied"])
def test_sharded_and_single_file_checkpoints_convert_identically(saved, tmp_path, variant):
    hf, single = saved(variant)
    sharded = save_hf(hf, tmp_path, max_shard_size="60KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 1
    config = json.loads((single / "config.json").read_text())
    a = hf_to_mlx(config["model_type"], config, read_checkpoint(single).unwrap()).unwrap()
    b = hf_to_mlx(config["model_type"], config, read_checkpoint(sharded).unwrap()).unwrap()
    assert a.keys() == b.keys() == expected_shapes(config["model_type"], config).keys()
    assert all(mx.array_equal(a[k], b[k]).item() for k in a)


@pytest.mark.parametrize(
    ("variant", "change"),
    [
        ("llama3", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
        ("llama-linear", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
        ("mistral", {"sliding_window": None}),
        ("qwen2-sliding", {"use_sliding_window": False}),
    ],
)
def test_rope_scaling_and_sliding_window_change_the_logits(saved, variant, change):
    """Guards the parity tests above: these settings are not no-ops at the lengths we test."""
    directory = saved(variant)[1]
    config = json.loads((directory / "config.json").read_text())
    weights = list(
        hf_to_mlx(config["model_type"], config, read_checkpoint(directory).unwrap()).unwrap().items()
    )
    ids = mx.array(random_ids(1, 20))
    plain = build(config | change).load_weights(weights)(ids)
    assert mx.abs(plain - load_ours(directory)(ids)).max().item() > 1e-2


def hf_weights(saved, variant: str) -> tuple[dict, dict[str, mx.array]]:
    directory = saved(variant)[1]
    return json.loads((directory / "config.json").read_text()), read_checkpoint(directory).unwrap()


def test_unknown_and_missing_keys_are_named(saved):
    config, weights = hf_weights(saved, "llama")
    weights = dict(weights)
    weights["model.layers.0.self_attn.extra.weight"] = mx.zeros((2,))
    del weights["model.layers.1.mlp.up_proj.weight"]
    match hf_to_mlx("llama", config, weights):
        case Failure(message):
            assert "unknown keys 1: model.layers.0.self_attn.extra.weight" in message
            assert "missing keys 1: model.layers.1.mlp.up_proj.weight" in message
        case _:
            pytest.fail("expected a Failure")


def test_shape_mismatch_names_the_tensor(saved):
    config, weights = hf_weights(saved, "gpt2")
    bad = dict(weights) | {"transformer.h.1.mlp.c_fc.weight": mx.zeros((256, 64))}
    message = hf_to_mlx("gpt2", config, bad).failure()
    assert (
        message
        == "shape mismatch for transformer.h.1.mlp.c_fc.weight: expected (64, 256), got (256, 64)"
    )


def test_bare_gpt2_keys_and_buffers_convert_like_prefixed_ones(saved):
    config, weights = hf_weights(saved, "gpt2")
    bare = {k.removeprefix("transformer."): v for k, v in weights.items()}
    bare |= {"h.0.attn.bias": mx.ones((1, 1, 8, 8)), "h.0.attn.masked_bias": mx.array(-1e4)}
    a, b = hf_to_mlx("gpt2", config, weights).unwrap(), hf_to_mlx("gpt2", config, bare).unwrap()
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]).item() for k in a)
    assert isinstance(
        hf_to_mlx("gpt2", config, weights | bare), Failure
    )  # both spellings: ambiguous


def test_tied_head_equal_to_embeddings_is_dropped_and_a_different_one_refused(saved):
    config, weights = hf_weights(saved, "llama-tied")
    embed = weights["model.embed_tokens.weight"]
    out = hf_to_mlx("llama", config, weights | {"lm_head.weight": mx.array(embed)}).unwrap()
    assert "lm_head.weight" not in out
    message = hf_to_mlx("llama", config, weights | {"lm_head.weight": embed + 1}).failure()
    assert "lm_head.weight differs" in message


def test_export_round_trip_restores_the_checkpoint(saved):
    config, weights = hf_weights(saved, "gpt2")
    back = mlx_to_hf("gpt2", config, hf_to_mlx("gpt2", config, weights).unwrap())
    assert back.keys() == weights.keys()
    assert all(mx.array_equal(back[k], weights[k]).item() for k in weights)


def test_unsupported_model_type_and_config_errors():
    assert "supported: llama, mistral, qwen2, qwen3, gemma" in hf_to_mlx("bert", {}, {}).failure()
    assert "lacks field 'n_embd'" in hf_to_mlx("gpt2", {"model_type": "gpt2"}, {}).failure()
    with pytest.raises(ValueError, match="supported: llama, mistral, qwen2, qwen3"):
        build({"model_type": "bert"})
    with pytest.raises(ValueError, match="rope type 'proportional' is not supported"):
        build(
            build_hf("llama").config.to_dict()
            | {"rope_parameters": {"rope_type": "proportional", "factor": 2.0}}
        )
    with pytest.raises(ValueError, match="activation 'swish' is not supported"):
        build(build_hf("gpt2").config.to_dict() | {"activation_function": "swish"})


def test_missing_checkpoint_files_are_reported(tmp_path):
    assert "no weights found (expected model.safetensors" in read_checkpoint(tmp_path).failure()


def test_converted_results_are_success_values(saved):
    config, weights = hf_weights(saved, "qwen2")
    assert isinstance(hf_to_mlx("qwen2", config, weights), Success)
