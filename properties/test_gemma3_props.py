"""Invariants of reading Gemma 3 image-text checkpoints (`gemma3`) as their text model (pure core).

A hub config nesting only what differs reads as the complete one transformers writes; either
spelling of the text model's tensors (`language_model.model.` as transformers 5 saves it, or its
module names `model.language_model.`) converts alike, the vision tower and projector never matter,
a tensor spelled both ways is refused, and the fused model's names come back in the base's spelling;
the PEFT targets match exactly the adapted language-model linears, never the vision tower's.
"""

from __future__ import annotations

import re

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from returns.result import Failure
from transformers import Gemma3Config

from finetune.core import architectures, convert, peft

PROPS = settings(max_examples=40, deadline=None)
OLD, OURS = "language_model.model.", "model.language_model."
VISION = ("vision_tower.encoder.layers.0.self_attn.q_proj.weight", "vision_tower.embeddings.patch_embedding.weight",
          "multi_modal_projector.mm_input_projection_weight", "multi_modal_projector.mm_soft_emb_norm.weight")


@st.composite
def text_configs(draw) -> dict:
    """A complete small text_config (sizes, window, layer pattern, both RoPE bases)."""
    heads = draw(st.sampled_from([1, 2, 4]))
    n = draw(st.integers(1, 4))
    return {
        "num_hidden_layers": n, "vocab_size": draw(st.integers(4, 12)), "num_attention_heads": heads,
        "num_key_value_heads": draw(st.sampled_from([d for d in (1, 2, 4) if heads % d == 0])),
        "hidden_size": heads * 4, "intermediate_size": draw(st.integers(1, 6)), "head_dim": draw(st.sampled_from([2, 4])),
        "sliding_window": draw(st.integers(2, 8)), "query_pre_attn_scalar": draw(st.sampled_from([4, 16, 256])),
        "max_position_embeddings": 64,
    }


@PROPS
@given(st.sets(st.sampled_from(["hidden_size", "intermediate_size", "num_hidden_layers", "sliding_window",
                                "rope_scaling", "num_attention_heads", "head_dim", "vocab_size"])),
       st.booleans())
def test_a_hub_config_reads_as_the_complete_one_transformers_writes(fields, tied):
    """Hub image-text configs (google/gemma-3-4b-it) nest only what differs from Gemma3TextConfig."""
    given_ = {"hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34, "sliding_window": 1024,
              "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "num_attention_heads": 16, "head_dim": 128,
              "vocab_size": 1000}
    sparse = {"model_type": "gemma3", "tie_word_embeddings": tied,
              "text_config": {"model_type": "gemma3_text"} | {k: given_[k] for k in fields}}
    complete = Gemma3Config(text_config=dict(sparse["text_config"]), tie_word_embeddings=tied).to_dict()
    assert architectures.decoder(sparse) == architectures.decoder(complete)
    assert architectures.dims(sparse).unwrap() == architectures.dims(complete).unwrap()
    assert architectures.decoder(sparse).layout[0] == "model.language_model"


def checkpoint(config: dict, seed: int) -> dict[str, np.ndarray]:
    """Random tensors with every expected key, in our (module) spelling."""
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in convert.expected_shapes("gemma3", config).items()}


def spelled_old(key: str) -> str:
    return OLD + key[len(OURS):] if key.startswith(OURS) else "language_model." + key if key == "lm_head.weight" else key


@PROPS
@given(text_configs(), st.booleans(), st.integers(0, 2**32 - 1), st.data())
def test_either_spelling_converts_alike_and_fuses_back_in_its_own(text, tied, seed, data):
    config = {"model_type": "gemma3", "tie_word_embeddings": tied, "text_config": text}
    ours = checkpoint(config, seed)
    vision = {k: np.ones(2, np.float32) for k in data.draw(st.sets(st.sampled_from(VISION)))}
    modern = {("model." + k if not k.startswith("model.") else k): v for k, v in vision.items()}
    old = {spelled_old(k): v for k, v in ours.items()} | vision
    for stored in (old, ours | modern):
        out = convert.hf_to_mlx("gemma3", config, stored).unwrap()
        assert out.keys() == ours.keys() and all(out[k] is ours[k] for k in ours)
        assert convert.other_parts("gemma3", stored).keys() == (vision.keys() if stored is old else modern.keys())
        assert convert.stored_names("gemma3", out, list(stored)) | convert.other_parts("gemma3", stored) == stored
    twice = next(iter(ours))
    assert isinstance(convert.hf_to_mlx("gemma3", config, old | {twice: ours[twice]}), Failure)
    gone = data.draw(st.sampled_from(sorted(ours)))
    failure = convert.hf_to_mlx("gemma3", config, {k: v for k, v in old.items() if k != spelled_old(gone)}).failure()
    assert f"missing keys 1: {spelled_old(gone)}" in failure  # named as the checkpoint spells it


@PROPS
@given(st.integers(1, 6), st.data())
def test_peft_targets_match_exactly_the_adapted_language_model_linears(layers, data):
    arch = architectures.GEMMA3
    keys = data.draw(st.sets(st.sampled_from([p for p, _, _ in arch.linears]), min_size=1))
    chosen = data.draw(st.sets(st.integers(0, layers - 1), min_size=1))
    every = chosen == set(range(layers))
    paths = [f"{arch.blocks}.{i}.{k}" for i in sorted(chosen) for k in sorted(keys)]
    pattern = peft.scoped_targets(paths, every)
    modules = [f"{arch.blocks}.{i}.{p}" for i in range(layers) for p, _, _ in arch.linears]
    modules += [f"model.vision_tower.encoder.layers.{i}.self_attn.{k}" for i in range(layers) for k in ("q_proj", "k_proj")]
    assert sorted(m for m in modules if re.fullmatch(pattern, m)) == sorted(paths)


@PROPS
@given(text_configs(), st.data())
def test_per_layer_quantization_reads_and_writes_in_mlx_lms_names(text, data):
    """mlx-lm names a gemma3's modules `language_model.model.*`; we read them as ours and write them back so."""
    from finetune.core import fusing, quantization

    config = {"model_type": "gemma3", "text_config": text}
    paths = sorted(k.removesuffix(".weight") for k, s in convert.expected_shapes("gemma3", config).items() if len(s) == 2)
    chosen = data.draw(st.lists(st.sampled_from(paths), unique=True, max_size=4))
    own = {p: data.draw(st.sampled_from([None, quantization.Params(group_size=32, bits=8)])) for p in chosen}
    quant = quantization.Quant(default=quantization.Params(group_size=64, bits=4), overrides=own)
    block = fusing.fused_config(config, "float16", quant)["quantization"]
    assert sorted(k for k in block if k not in ("group_size", "bits", "mode")) == sorted(OLD + p[len(OURS):] for p in chosen)
    assert quantization.from_config(config | {"quantization": block}).unwrap() == quant
