"""Invariants of the pure GGUF <-> HF mapping: names, Q/K rows, tensor values, metadata <-> config."""

from __future__ import annotations

import gguf
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from finetune.core import gguf as g

PROPS = settings(max_examples=60, deadline=None)
ARCHS = sorted(g.BLOCKS)


def all_gguf_names(arch: str, layers: int) -> list[str]:
    top = [t.gguf for t in g._TOP]
    return top + [f"blk.{i}.{t.gguf}" for i in range(layers) for t in g.BLOCKS[arch]]


@PROPS
@given(st.sampled_from(ARCHS), st.integers(1, 40))
def test_names_round_trip_and_are_injective(arch, layers):
    names = all_gguf_names(arch, layers)
    hf = {n: g.to_hf_name(n, arch) for n in names}
    mapped = {n: h for n, h in hf.items() if h is not None}
    assert set(names) - set(mapped) == {"rope_freqs.weight"}  # llama.cpp-only
    assert len(set(mapped.values())) == len(mapped)  # injective
    assert all(g.to_gguf_name(h, arch) == n for n, h in mapped.items())  # unmap(map(x)) == x


@PROPS
@given(st.sampled_from(ARCHS), st.integers(1, 12))
def test_names_agree_with_gguf_py_tensor_map(arch, layers):
    """gguf-py's TensorNameMap is what llama.cpp's converter names tensors with."""
    kind = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    reference = gguf.get_tensor_name_map(kind, layers)
    known = {gguf.TENSOR_NAMES[t].format(bid=i) for t in gguf.MODEL_TENSORS[kind] for i in range(layers)}
    checked = 0
    for name in all_gguf_names(arch, layers):
        hf = g.to_hf_name(name, arch)
        if hf is not None and name.rsplit(".", 1)[0] in known:  # Gemma has no output.weight there
            assert reference.get_name(hf, try_suffixes=(".weight", ".bias")) == name, (arch, hf)
            checked += 1
    assert checked >= 2 + 7 * layers


@PROPS
@given(st.sampled_from(ARCHS), st.text(alphabet="blk.0123456789_attnqkvoutpmodelyrsfwigh", max_size=40))
def test_any_string_maps_to_none_or_round_trips(arch, name):
    hf = g.to_hf_name(name, arch)
    assert hf is None or g.to_gguf_name(hf, arch) == name
    back = g.to_gguf_name(name, arch)
    assert back is None or g.to_hf_name(back, arch) == name


@st.composite
def qk_weights(draw):
    heads = draw(st.integers(1, 4))
    half = draw(st.integers(1, 4))
    cols = draw(st.sampled_from([(), (1,), (3,)]))
    shape = (heads * 2 * half, *cols)
    w = draw(arrays(np.float32, shape, elements=st.floats(-10, 10, width=32)))
    return w, heads, half


@PROPS
@given(qk_weights())
def test_permutation_round_trips_pairs_rotary_halves_and_mutates_nothing(case):
    w, heads, half = case
    before = w.copy()
    p = g.permute_qk(w, heads)
    assert np.array_equal(w, before)
    assert np.array_equal(g.unpermute_qk(p, heads), w) and np.array_equal(g.permute_qk(g.unpermute_qk(w, heads), heads), w)
    d = 2 * half  # llama.cpp row 2j (2j+1) of a head holds HF row j (j + d/2): the two rotary halves
    for h in range(heads):
        for j in range(half):
            assert np.array_equal(p[h * d + 2 * j], w[h * d + j])
            assert np.array_equal(p[h * d + 2 * j + 1], w[h * d + j + half])


@PROPS
@given(st.sampled_from(ARCHS), st.sampled_from(["blk.0.attn_q.weight", "blk.1.attn_k.bias", "blk.0.attn_norm.weight",
                                                "blk.0.ffn_up.weight", "output_norm.weight"]),
       arrays(np.float32, (8, 3), elements=st.floats(-4, 4, width=32)))
def test_tensor_values_round_trip(arch, name, w):
    config = {"num_attention_heads": 4, "num_key_value_heads": 2}
    w = w[:, 0] if name.endswith(("bias", "norm.weight")) else w
    there = g.to_gguf_tensor(arch, name, w, config)
    assert np.allclose(g.to_hf_tensor(arch, name, there, config), w, atol=1e-6)
    if arch in g.NORM_OFFSET and name.endswith("norm.weight"):
        assert np.allclose(there, w + 1.0)


@st.composite
def metadata(draw) -> dict:
    arch = draw(st.sampled_from(ARCHS))
    kv = draw(st.sampled_from([1, 2, 4]))
    heads = kv * draw(st.sampled_from([1, 2, 3]))
    head_dim = draw(st.sampled_from([8, 16, 64, 128]))
    meta = {
        "general.architecture": arch,
        f"{arch}.block_count": draw(st.integers(1, 48)),
        f"{arch}.embedding_length": draw(st.sampled_from([heads * head_dim, 64, 576, 4096])),
        f"{arch}.feed_forward_length": draw(st.integers(1, 20000)),
        f"{arch}.attention.head_count": heads,
        f"{arch}.attention.head_count_kv": kv,
        f"{arch}.context_length": draw(st.sampled_from([256, 2048, 8192, 131072])),
        f"{arch}.attention.layer_norm_rms_epsilon": draw(st.sampled_from([1e-5, 1e-6, 1e-12])),
        f"{arch}.rope.freq_base": draw(st.sampled_from([10000.0, 500000.0, 1e6])),
        f"{arch}.rope.dimension_count": head_dim // (2 if arch == "phi3" and draw(st.booleans()) else 1),
        f"{arch}.attention.key_length": head_dim,
        f"{arch}.attention.value_length": head_dim,
        f"{arch}.vocab_size": draw(st.integers(2, 200000)),
    }
    if draw(st.booleans()):
        meta[f"{arch}.rope.scaling.type"] = "linear"
        meta[f"{arch}.rope.scaling.factor"] = draw(st.sampled_from([2.0, 4.0, 8.0]))
    for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
        if draw(st.booleans()):
            meta[f"tokenizer.ggml.{key}"] = draw(st.integers(0, 10))
    if arch.startswith("gemma") or (arch == "phi3" and draw(st.booleans())):
        meta[f"{arch}.attention.sliding_window"] = draw(st.sampled_from([512, 4096]))
    if arch == "gemma2":
        meta[f"{arch}.attn_logit_softcapping"] = 50.0
        meta[f"{arch}.final_logit_softcapping"] = 30.0
    return meta


@PROPS
@given(metadata(), st.booleans())
def test_metadata_to_config_to_metadata_is_the_identity(meta, untied):
    tensors = {"output.weight": (1, 1)} if untied else {}
    config = g.config_from_metadata(meta, tensors).unwrap()
    assert config["tie_word_embeddings"] is not untied
    assert config["model_type"] == g.ARCHITECTURES[meta["general.architecture"]]
    assert g.metadata_from_config(config) == meta


@PROPS
@given(st.sampled_from([16, 32, 64, 128]), st.sampled_from([10000.0, 500000.0]), st.floats(1.5, 32.0),
       st.floats(0.5, 2.0), st.floats(2.5, 8.0), st.sampled_from([256, 2048, 8192]))
def test_llama3_rope_factors_recover_a_rope_with_the_same_frequencies(head_dim, theta, factor, low, high, old):
    config = {"model_type": "llama", "num_attention_heads": 4, "hidden_size": 4 * head_dim, "head_dim": head_dim,
              "rope_parameters": {"rope_type": "llama3", "rope_theta": theta, "factor": factor,
                                  "low_freq_factor": low, "high_freq_factor": high,
                                  "original_max_position_embeddings": old}}
    factors = g.llama3_rope_factors(config)
    meta = {"general.architecture": "llama", "llama.block_count": 1, "llama.embedding_length": 4 * head_dim,
            "llama.feed_forward_length": 8, "llama.attention.head_count": 4, "llama.rope.freq_base": theta,
            "llama.attention.key_length": head_dim, "llama.vocab_size": 10, "llama.context_length": 4 * old}
    recovered = g.config_from_metadata(meta, {}, factors).unwrap()
    if np.allclose(factors, 1.0):
        assert "rope_scaling" not in recovered
        return
    again = g.llama3_rope_factors(recovered | {"rope_parameters": recovered["rope_scaling"] | {"rope_theta": theta}})
    assert np.allclose(again, factors, rtol=1e-4)


def test_unknown_architectures_and_bad_metadata_are_refused_in_one_line():
    assert "GGUF architecture 'mamba' is not supported" in g.config_from_metadata({"general.architecture": "mamba"}).failure()
    meta = {"general.architecture": "llama", "llama.block_count": 2, "llama.embedding_length": 8,
            "llama.feed_forward_length": 8, "llama.attention.head_count": 0}
    assert "llama.attention.head_count is missing or not a positive integer" in g.config_from_metadata(meta).failure()
