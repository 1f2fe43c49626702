"""The architecture registry is the one statement of each model_type: every consumer agrees with it.

For every variant transformers builds (llama with and without biases or ties, llama3 and linear
RoPE, mistral, qwen2, gpt2 tied and untied): the registry's tensor table equals the MLX module's
parameters, its linear layers are the module's (with the shapes `ModelFacts` reports), its
Conv1D set is what transformers stores transposed, and its block prefixes are the module's.
"""

from __future__ import annotations

import pytest
from hf_models import VARIANTS, build_hf, tiny_config
from mlx.utils import tree_flatten

from finetune.core import adapters as core_adapters
from finetune.core import architectures, convert, modelinfo
from finetune.models import build
from finetune.models import lora as lora_modules


@pytest.mark.parametrize("variant", VARIANTS)
def test_registry_tables_equal_the_modules_and_transformers(variant):
    config = tiny_config(variant).to_dict()
    arch = architectures.REGISTRY[config["model_type"]]
    model = build(config)
    assert set(dict(tree_flatten(model.parameters()))) == set(convert.expected_shapes(config["model_type"], config))
    facts = modelinfo.facts(config).unwrap()
    shapes = facts.linear_shapes()
    assert tuple(sorted(shapes)) == lora_modules.block_linears(model)
    assert lora_modules.linear_shapes(model, [f"{arch.blocks}.0.{k}" for k in shapes]) == {
        f"{arch.blocks}.0.{k}": v for k, v in shapes.items()
    }
    assert lora_modules.layers_prefix(model) == arch.blocks
    hf = dict(build_hf(variant).state_dict())
    for path, (fan_in, fan_out) in shapes.items():
        stored = tuple(hf[f"{arch.blocks}.0.{path}.weight"].shape)
        assert stored == ((fan_in, fan_out) if path in arch.conv1d else (fan_out, fan_in)), path


def test_every_consumer_lists_the_registry_types():
    assert convert.SUPPORTED == modelinfo.SUPPORTED == architectures.SUPPORTED
    assert set(core_adapters.BLOCK_LINEARS) == set(architectures.FAMILIES)


def test_a_config_lacking_a_field_is_named():
    failure = modelinfo.facts({"model_type": "llama", "hidden_size": 8}).failure()
    assert failure == "config.json lacks field 'num_attention_heads' for model_type 'llama'"
    assert "unsupported architecture 'bert'" in modelinfo.facts({"model_type": "bert"}).failure()
