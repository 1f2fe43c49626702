"""Invariants of the registry's pure config reading (core/architectures, arch_rows, arch_rope).

Both config styles read alike (transformers 5's `rope_parameters`/`layer_types` and hub
checkpoints' top-level `rope_theta`/`rope_scaling`, gemma3's `rope_local_base_freq` and
`sliding_window_pattern`); windows and no-rope layers land where the family puts them; the RoPE
variants relate to plain RoPE as their definitions say; every row's tensor table is consistent.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finetune.core import arch_rope, architectures

PROPS = settings(max_examples=60, deadline=None)
LLAMA_LIKE = ("llama", "qwen2", "qwen3", "olmo2", "granite", "smollm3", "phi3", "gemma", "starcoder2")


@st.composite
def sizes(draw) -> dict:
    heads = draw(st.sampled_from([1, 2, 4]))
    return {
        "num_hidden_layers": draw(st.integers(1, 8)), "vocab_size": draw(st.integers(8, 64)),
        "num_attention_heads": heads, "hidden_size": heads * draw(st.sampled_from([4, 8, 16])),
        "num_key_value_heads": draw(st.sampled_from([d for d in (1, 2, 4) if heads % d == 0])),
        "intermediate_size": draw(st.integers(4, 32)), "max_position_embeddings": draw(st.sampled_from([32, 64, 128])),
    }


@st.composite
def scalings(draw) -> dict:
    """A rope scaling dict without rope_theta, in transformers 5's spelling (`rope_type`)."""
    kind = draw(st.sampled_from(["default", "linear", "dynamic", "yarn", "llama3"]))
    factor = draw(st.sampled_from([2.0, 4.0, 8.0]))
    extra = {
        "default": {}, "linear": {"factor": factor}, "dynamic": {"factor": factor},
        "yarn": {"factor": factor, "original_max_position_embeddings": 16},
        "llama3": {"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 16},
    }[kind]
    return {"rope_type": kind, **extra}


thetas = st.sampled_from([500.0, 10000.0, 1e6])


@PROPS
@given(st.sampled_from(LLAMA_LIKE), sizes(), scalings(), thetas)
def test_both_config_styles_read_alike(model_type, c, scaling, theta):
    c = c | {"model_type": model_type}
    new = c | {"rope_parameters": scaling | {"rope_theta": theta}}
    hub_scaling = {("type" if k == "rope_type" else k): v for k, v in scaling.items()}
    old = c | {"rope_theta": theta, "rope_scaling": None if scaling["rope_type"] == "default" else hub_scaling}
    if model_type == "phi3" and scaling["rope_type"] == "yarn":
        # Phi3Config reads yarn as longrope, whose short/long factors yarn lacks: both refused.
        for config in (new, old):
            with pytest.raises(ValueError, match="'longrope' needs short_factor and long_factor"):
                architectures.decoder(config)
        return
    assert architectures.decoder(new) == architectures.decoder(old)
    snapshot = dict(new)
    architectures.decoder(new)
    assert new == snapshot  # never mutates its argument


@PROPS
@given(sizes(), st.integers(2, 6), thetas, thetas, st.sampled_from([None, {"rope_type": "linear", "factor": 8.0}]))
def test_gemma3_hub_and_transformers5_configs_read_alike(c, pattern, global_theta, local_theta, scaling):
    c = c | {"model_type": "gemma3_text", "sliding_window": 5, "head_dim": 8}
    n = c["num_hidden_layers"]
    types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    new = c | {"layer_types": types, "rope_parameters": {
        "full_attention": (scaling or {"rope_type": "default"}) | {"rope_theta": global_theta},
        "sliding_attention": {"rope_type": "default", "rope_theta": local_theta}}}
    old = c | {"sliding_window_pattern": pattern, "rope_theta": global_theta, "rope_local_base_freq": local_theta,
               "rope_scaling": scaling}
    spec = architectures.decoder(new)
    assert spec == architectures.decoder(old)
    assert spec.windows == tuple(5 if t == "sliding_attention" else 0 for t in types)
    for t, rope in zip(types, spec.ropes, strict=True):
        assert rope.theta == (local_theta if t == "sliding_attention" else global_theta)
        assert rope.kind == ("default" if t == "sliding_attention" or not scaling else "linear")


@PROPS
@given(sizes(), st.integers(2, 5), st.booleans())
def test_windows_and_rope_free_layers_follow_the_family(c, interval, sliding):
    n = c["num_hidden_layers"]
    smol = architectures.decoder(c | {"model_type": "smollm3", "no_rope_layer_interval": interval,
                                      "use_sliding_window": sliding, "sliding_window": 7})
    uses = [(i + 1) % interval != 0 for i in range(n)]
    assert [r.kind != "none" for r in smol.ropes] == uses
    assert smol.windows == tuple(7 if sliding and not u else 0 for u in uses)
    gemma2 = architectures.decoder(c | {"model_type": "gemma2", "sliding_window": 3, "head_dim": 4})
    assert gemma2.windows == tuple(3 if i % 2 == 0 else 0 for i in range(n))
    mistral = architectures.decoder(c | {"model_type": "mistral", "sliding_window": 9})
    assert mistral.windows == (9,) * n and architectures.decoder(c | {"model_type": "mistral"}).windows == (4096,) * n
    qwen = architectures.decoder(c | {"model_type": "qwen3", "use_sliding_window": sliding, "sliding_window": 6,
                                      "max_window_layers": 1})
    assert qwen.windows == tuple(6 if sliding and i >= 1 else 0 for i in range(n))


@PROPS
@given(st.sampled_from([8, 16, 32]), thetas, st.sampled_from([2.0, 4.0, 8.0]), st.integers(1, 64))
def test_rope_variants_relate_to_plain_rope(dims, theta, factor, length):
    plain = [theta ** (-(i / dims)) for i in range(0, dims, 2)]
    rope = arch_rope.Rope(theta=theta, dims=dims, factor=factor, original_max=16, max_positions=32)
    assert arch_rope.inv_freq(rope, length) is None  # the kernel's own base
    linear = arch_rope.inv_freq(arch_rope.Rope(**{**_fields(rope), "kind": "linear"}), length)
    assert all(math.isclose(a, b / factor) for a, b in zip(linear, plain, strict=True))
    dynamic = arch_rope.inv_freq(arch_rope.Rope(**{**_fields(rope), "kind": "dynamic"}), length)
    assert (dynamic is None) == (length <= 32)  # NTK only past max_position_embeddings
    for kind in ("llama3", "yarn"):
        scaled = arch_rope.inv_freq(arch_rope.Rope(**{**_fields(rope), "kind": kind}), length)
        assert all(b / factor * (1 - 1e-9) <= a <= b * (1 + 1e-9) for a, b in zip(scaled, plain, strict=True))
        if kind == "yarn":
            assert math.isclose(scaled[0], plain[0])  # the fastest rotation is extrapolated, kept
    short, long = tuple(1.0 + i for i in range(dims // 2)), tuple(2.0 + i for i in range(dims // 2))
    lr = arch_rope.Rope(**{**_fields(rope), "kind": "longrope", "short_factor": short, "long_factor": long})
    got = arch_rope.inv_freq(lr, length)
    ext = long if length > 16 else short
    assert all(math.isclose(a, b / e) for a, b, e in zip(got, plain, ext, strict=True))


def _fields(rope: arch_rope.Rope) -> dict:
    return {f: getattr(rope, f) for f in rope.__struct_fields__}


@PROPS
@given(st.sampled_from(architectures.SUPPORTED), sizes(), st.booleans())
def test_every_row_table_is_consistent(model_type, c, tied):
    arch = architectures.REGISTRY[model_type]
    if model_type == "gpt2":
        c = {"n_layer": c["num_hidden_layers"], "vocab_size": c["vocab_size"], "n_embd": c["hidden_size"],
             "n_head": c["num_attention_heads"], "n_positions": c["max_position_embeddings"]}
    c = c | {"model_type": model_type, "tie_word_embeddings": tied}
    if model_type == "gemma3":  # image-text: the sizes nest in text_config, the tie stays on top
        c = {"model_type": model_type, "tie_word_embeddings": tied, "text_config": c | {"model_type": "gemma3_text"}}
    d = arch.read(model_type, c)
    names = [n for n, _, _ in arch.top] + [n for n, _, _ in arch.layer]
    assert len(names) == len(set(names))
    for path, _, _ in arch.linears:
        assert any(n == f"{path}.weight" for n, _, _ in arch.layer), path
    linear = architectures.linear_shapes(arch, d)
    symbols = d.symbols()
    for path, (fan_in, fan_out) in linear.items():
        shape = next(s for n, s, _ in arch.layer if n == f"{path}.weight")
        assert (symbols[shape[0]], symbols[shape[1]]) == (fan_out, fan_in)
    spec = architectures.decoder(c)
    assert len(spec.windows) == len(spec.ropes) == d.layers and spec.tied == tied
    assert all(r.kind == "none" or 0 < r.dims <= d.head_dim for r in spec.ropes)
