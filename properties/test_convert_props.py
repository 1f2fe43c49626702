"""Invariants of HF <-> MLX weight conversion on random tiny configs and tensors."""

from __future__ import annotations

import re

import mlx.core as mx
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from returns.result import Failure

from finetune.core import architectures
from finetune.core.convert import (
    SUPPORTED,
    expected_shapes,
    hf_to_mlx,
    merge_shards,
    mlx_to_hf,
)
from finetune.files.weights import cast_weights

PROPS = settings(max_examples=50, deadline=None)
# Spec, restated independently of the implementation: GPT-2 Conv1D weights are (in, out) in HF files.
CONV1D = re.compile(
    r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight"
)


@st.composite
def llama_configs(draw, model_type: str) -> dict:
    heads = draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([2, 4]))
    config = {
        "model_type": model_type,
        "num_attention_heads": heads,
        "num_key_value_heads": draw(st.sampled_from([d for d in (1, 2, 4) if heads % d == 0])),
        "hidden_size": draw(st.sampled_from([4, 8])),
        "intermediate_size": draw(st.integers(1, 6)),
        "num_hidden_layers": draw(st.integers(1, 2)),
        "vocab_size": draw(st.integers(2, 9)),
        "tie_word_embeddings": draw(st.booleans()),
    }
    if draw(st.booleans()):
        config["head_dim"] = head_dim
    if model_type == "llama":
        config |= {"attention_bias": draw(st.booleans()), "mlp_bias": draw(st.booleans())}
    if model_type == "gemma3":  # image-text: the sizes nest in text_config, the tie stays on top
        tied = config.pop("tie_word_embeddings")
        return {"model_type": "gemma3", "tie_word_embeddings": tied, "text_config": config | {"model_type": "gemma3_text"}}
    return config


@st.composite
def gpt2_configs(draw) -> dict:
    return {
        "model_type": "gpt2",
        "n_embd": draw(st.sampled_from([2, 4, 6])),
        "n_head": draw(st.sampled_from([1, 2])),
        "n_layer": draw(st.integers(1, 2)),
        "n_positions": draw(st.integers(1, 8)),
        "vocab_size": draw(st.integers(2, 9)),
        "n_inner": draw(st.sampled_from([None, 3, 5])),
        "tie_word_embeddings": draw(st.booleans()),
    }


configs = st.one_of(*(llama_configs(t) for t in SUPPORTED if t != "gpt2"), gpt2_configs())
seeds = st.integers(0, 2**32 - 1)


def hf_shape(key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape[::-1] if CONV1D.fullmatch(key) else shape


def random_checkpoint(config: dict, seed: int, layout: str) -> dict[str, mx.array]:
    """Random float32 tensors with every expected key, in HF or MLX layout."""
    rng = np.random.default_rng(seed)
    shapes = expected_shapes(config["model_type"], config)
    return {
        k: mx.array(rng.standard_normal(hf_shape(k, s) if layout == "hf" else s).astype(np.float32))
        for k, s in shapes.items()
    }


def same(a: dict[str, mx.array], b: dict[str, mx.array]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and mx.array_equal(a[k], b[k]).item() for k in a
    )


def snapshot(weights: dict[str, mx.array]) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in weights.items()}


@PROPS
@given(configs, seeds)
def test_hf_to_mlx_to_hf_is_identity(config, seed):
    hf = random_checkpoint(config, seed, "hf")
    t = config["model_type"]
    assert same(mlx_to_hf(t, config, hf_to_mlx(t, config, hf).unwrap()), hf)


@PROPS
@given(configs, seeds)
def test_mlx_to_hf_to_mlx_is_identity(config, seed):
    ours = random_checkpoint(config, seed, "mlx")
    t = config["model_type"]
    assert same(hf_to_mlx(t, config, mlx_to_hf(t, config, ours)).unwrap(), ours)


@PROPS
@given(configs, seeds)
def test_shapes_and_keys_match_the_config(config, seed):
    t = config["model_type"]
    out = hf_to_mlx(t, config, random_checkpoint(config, seed, "hf")).unwrap()
    assert out.keys() == expected_shapes(t, config).keys()
    assert {k: tuple(v.shape) for k, v in out.items()} == expected_shapes(t, config)
    head = architectures.REGISTRY[t].row.layout.head  # lm_head (GPT-NeoX: embed_out)
    assert (f"{head}.weight" in out) != config["tie_word_embeddings"]


@PROPS
@given(configs, seeds, st.data())
def test_key_mapping_is_injective_over_bare_and_prefixed_spellings(config, seed, data):
    t = config["model_type"]
    prefix = architectures.REGISTRY[t].prefix  # model., transformer., gpt_neox.
    hf = random_checkpoint(config, seed, "hf")
    bare = data.draw(st.sets(st.sampled_from(sorted(k for k in hf if k.startswith(prefix)))))
    spelled = {k.removeprefix(prefix) if k in bare else k: v for k, v in hf.items()}
    assert same(hf_to_mlx(t, config, spelled).unwrap(), hf_to_mlx(t, config, hf).unwrap())
    if bare:  # the same tensor under both spellings cannot be resolved
        assert isinstance(hf_to_mlx(t, config, spelled | hf), Failure)


@PROPS
@given(configs, seeds)
def test_transposes_are_involutions_and_leave_inputs_untouched(config, seed):
    t = config["model_type"]
    hf = random_checkpoint(config, seed, "hf")
    before, keys = snapshot(hf), list(hf)
    ours = hf_to_mlx(t, config, hf).unwrap()
    ours_before = snapshot(ours)
    back = mlx_to_hf(t, config, ours)
    assert list(hf) == keys and all(np.array_equal(np.array(hf[k]), before[k]) for k in keys)
    assert all(np.array_equal(np.array(ours[k]), ours_before[k]) for k in ours)
    for k, v in ours.items():
        expect = before[k].T if CONV1D.fullmatch(k) else before[k]
        assert np.array_equal(np.array(v), expect)
        assert np.array_equal(np.array(back[k]), before[k])


@PROPS
@given(configs, seeds, st.data())
def test_random_sharding_converts_like_a_single_file(config, seed, data):
    t = config["model_type"]
    hf = random_checkpoint(config, seed, "hf")
    n = data.draw(st.integers(1, 4))
    owner = data.draw(st.lists(st.integers(0, n - 1), min_size=len(hf), max_size=len(hf)))
    shards = [
        {k: v for (k, v), o in zip(hf.items(), owner, strict=True) if o == i} for i in range(n)
    ]
    merged = merge_shards(shards).unwrap()
    assert same(hf_to_mlx(t, config, merged).unwrap(), hf_to_mlx(t, config, hf).unwrap())
    if len(hf) > 1 and n > 1:  # a tensor repeated in another shard is refused
        key = next(iter(hf))
        assert isinstance(merge_shards([*shards, {key: hf[key]}]), Failure)


@PROPS
@given(
    st.lists(st.integers(-128, 128), min_size=1, max_size=16),
    st.sampled_from([mx.float16, mx.bfloat16]),
)
def test_dtype_casts_preserve_representable_values(values, dtype):
    weights = {
        "a.weight": mx.array(values, dtype=mx.float32),
        "q_proj.scales": mx.array(values, dtype=mx.int32),
    }
    low = cast_weights(weights, dtype)
    assert low["a.weight"].dtype == dtype and low["q_proj.scales"].dtype == mx.int32
    back = cast_weights(low, mx.float32)
    assert same(back, {"a.weight": weights["a.weight"], "q_proj.scales": weights["q_proj.scales"]})
    assert weights["a.weight"].dtype == mx.float32  # input untouched
