"""The architecture registry is the one statement of each model_type: every consumer agrees with it,
and every row runs in the one MLX decoder as transformers runs it.

For every variant transformers builds (the `hf_models` variants and one tiny model per registry
row, `ROWS`): the registry's tensor table equals the MLX module's parameters, its linear layers
are the module's (with the shapes `ModelFacts` reports), its Conv1D set is what transformers
stores transposed, and its block prefixes are the module's. Per row, on weights transformers saved
itself (norm gains perturbed, sequences longer than the sliding window): float32 logits within
1e-4 of transformers, cached decoding equal to the full forward, greedy generation equal, a LoRA
run through `ft train start` lowers the loss, `ft fuse` writes a model transformers loads with
our adapter logits, and the PEFT export gives them in peft.
"""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from hf_models import VARIANTS, build_hf, tiny_config
from lora_models import (
    make_tokenizer,
    max_diff,
    mlx_logits,
    ours,
    random_adapter,
    run_cli,
    torch_logits,
)
from mlx.utils import tree_flatten
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM

import finetune
from finetune.core import adapters as core_adapters
from finetune.core import architectures, convert, modelinfo
from finetune.engines.mlx import lora as lora_modules
from finetune.engines.mlx.generate import generate
from finetune.engines.mlx.model import build

TOL = 1e-4
TEXTS = [f"SELECT name FROM users WHERE id = {i}; hello world {i}" for i in range(10)]
_DIMS = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=1, pad_token_id=0)
_LONGROPE = dict(rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.75,
                 original_max_position_embeddings=16, short_factor=[1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                 long_factor=[1.0, 1.5, 2.5, 4.0, 6.0, 9.0])
# One tiny model per row (windows of 6 under 20-token rows; soft-caps small enough to bite).
ROWS: dict[str, tuple[str, dict]] = {
    "qwen3": ("qwen3", dict(_DIMS, head_dim=16, use_sliding_window=True, sliding_window=6, max_window_layers=1)),
    "gemma3_text": ("gemma3_text", dict(_DIMS, head_dim=16, num_hidden_layers=3, sliding_window=6,
                                        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                        query_pre_attn_scalar=24)),
    "gemma2": ("gemma2", dict(_DIMS, head_dim=16, sliding_window=6, query_pre_attn_scalar=24,
                              attn_logit_softcapping=2.0, final_logit_softcapping=4.0)),
    "phi3": ("phi3", dict(_DIMS, rope_parameters=dict(_LONGROPE), original_max_position_embeddings=16)),
    "olmo2": ("olmo2", dict(_DIMS)),
    "smollm3": ("smollm3", dict(_DIMS, no_rope_layer_interval=2)),
    "granite": ("granite", dict(_DIMS, embedding_multiplier=2.0, attention_multiplier=0.3, residual_multiplier=0.5,
                                logits_scaling=2.5)),
    "gemma": ("gemma", dict(_DIMS, head_dim=16)),
    "starcoder2": ("starcoder2", dict(_DIMS, sliding_window=6)),
    "gpt_neox": ("gpt_neox", dict(_DIMS, num_key_value_heads=None)),
    "gpt_neox-sequential": ("gpt_neox", dict(_DIMS, num_key_value_heads=None, use_parallel_residual=False)),
    "llama-yarn": ("llama", dict(_DIMS, rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                                original_max_position_embeddings=16))),
    "llama-dynamic": ("llama", dict(_DIMS, max_position_embeddings=16,
                                    rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0))),
}
_OFFSET_NORMS = ("gemma", "gemma2", "gemma3_text")  # norm weights applied as 1 + w
# RoPE that changes with the forward's length past 16 (as in HF, keys cached before then keep theirs).
_LENGTH_DEPENDENT = ("phi3", "llama-dynamic")


def row_config(row: str, vocab: int):
    model_type, fields = ROWS[row]
    fields = {k: v for k, v in fields.items() if v is not None}
    return AutoConfig.for_model(model_type, **fields, vocab_size=vocab)


def build_row(row: str, vocab: int, seed: int = 0):
    """transformers' own model of a row, order-one weights, norm gains perturbed away from 1."""
    config = row_config(row, vocab)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    gain = 0.0 if config.model_type in _OFFSET_NORMS else 1.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                p.copy_((gain if name.endswith(".weight") else 0.0) + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.12)
    return model


@pytest.mark.parametrize("variant", VARIANTS + tuple(ROWS))
def test_registry_tables_equal_the_modules_and_transformers(variant):
    config = (row_config(variant, 256) if variant in ROWS else tiny_config(variant)).to_dict()
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
    hf = dict((build_row(variant, 256) if variant in ROWS else build_hf(variant)).state_dict())
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


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "bpe")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tok):
    """row -> (transformers model, its saved directory with the tokenizer), built once."""
    cache: dict[str, tuple] = {}

    def get(row: str):
        if row not in cache:
            hf = build_row(row, tok[1])
            directory = tmp_path_factory.mktemp(row) / "model"
            hf.save_pretrained(directory)
            for f in tok[0].iterdir():
                (directory / f.name).write_bytes(f.read_bytes())
            cache[row] = (hf, directory)
        return cache[row]

    return get


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data") / "text"
    d.mkdir()
    for split, part in (("train", TEXTS[:8]), ("valid", TEXTS[8:])):
        (d / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
    return d


def text_loss(directory, adapter=None) -> float:
    """Mean next-token cross-entropy of our model on the training texts."""
    model, tokenizer = finetune.load(str(directory), adapter=None if adapter is None else str(adapter))
    total, count = 0.0, 0
    for text in TEXTS[:8]:
        ids = mx.array([tokenizer.encode(text)])
        ce = nn.losses.cross_entropy(model(ids[:, :-1]), ids[:, 1:], reduction="sum")
        total, count = total + ce.item(), count + ids.shape[1] - 1
    return total / count


def ids_of(vocab: int, batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(2, vocab, size=(batch, length))


@pytest.mark.parametrize("row", ROWS)
def test_row_matches_transformers_logits_cache_and_greedy_generation(saved, tok, row):
    hf, directory = saved(row)
    model = ours(directory)
    ids = ids_of(tok[1], 2, 20)  # longer than every window (6) and than the scaled ropes' 16
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(ids)).logits.numpy()
    mine = np.array(model(mx.array(ids)))
    assert np.abs(mine - theirs).max() <= TOL
    assert np.abs(theirs).max() > 1.0  # logits of order one: a wrong detail shows far above TOL

    n = 16 if row in _LENGTH_DEPENDENT else 20
    full = model(mx.array(ids[:, :n]))
    cache = model.make_cache()
    steps = [model(mx.array(ids[:, :9]), cache=cache)] + [model(mx.array(ids[:, t : t + 1]), cache=cache)
                                                         for t in range(9, n)]
    assert mx.abs(mx.concatenate(steps, axis=1) - full).max().item() <= TOL

    prompt = [int(i) for i in ids[0, : 9 if row in _LENGTH_DEPENDENT else 12]]
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert list(generate(model, prompt, max_tokens=6)) == out[0, len(prompt) :].tolist()


def test_the_rows_details_are_not_no_ops(saved):
    """Guards the parity test: each row's distinguishing setting changes the logits at its length."""
    cases = {
        "gemma2": {"attn_logit_softcapping": None}, "gemma3_text": {"sliding_window": 64},
        "qwen3": {"use_sliding_window": False}, "granite": {"residual_multiplier": 1.0},
        "smollm3": {"no_rope_layers": [1, 1]}, "phi3": {"original_max_position_embeddings": 64},
        "gpt_neox": {"use_parallel_residual": False}, "llama-yarn": {"rope_parameters": {"rope_theta": 10000.0}},
        "llama-dynamic": {"rope_parameters": {"rope_theta": 10000.0}}, "starcoder2": {"sliding_window": None},
    }
    ids = mx.array(ids_of(200, 1, 20))
    for row, change in cases.items():
        directory = saved(row)[1]
        config = json.loads((directory / "config.json").read_text())
        model = ours(directory)
        changed = build(config | change).load_weights(list(tree_flatten(model.parameters())))
        assert mx.abs(changed(ids) - model(ids)).max().item() > 1e-2, row


@pytest.mark.parametrize("row", ROWS)
def test_row_trains_fuses_and_exports_to_peft(saved, tok, text_data, tmp_path, capsys, row):
    hf, base = saved(row)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "start", base, text_data, "--iters", "4", "--batch-size", "8",
                           "--learning-rate", "5e-3", "--eval-every", "0", "--output", run)
    assert code == 0, err
    before, after = text_loss(base), text_loss(base, run)
    assert after < before - 0.05, (before, after)

    adapter = random_adapter(base, tmp_path / "adapter", rank=4, scale=2.0)
    expected = mlx_logits(ours(base, adapter))
    assert max_diff(expected, mlx_logits(ours(base))) > 0.1  # the adapter matters
    fused = tmp_path / "fused"
    code, _, err = run_cli(capsys, "fuse", base, "--adapter", adapter, "--output", fused)
    assert code == 0, err
    assert max_diff(torch_logits(AutoModelForCausalLM.from_pretrained(fused).eval()), expected) <= TOL

    peft_dir = tmp_path / "peft"
    code, _, err = run_cli(capsys, "adapters", "export", adapter, "--format", "peft", "--output", peft_dir)
    assert code == 0, err
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), peft_dir).eval()
    assert max_diff(torch_logits(theirs), expected) <= TOL


def test_models_info_names_the_engines_that_train_a_model(saved, capsys):
    from finetune.cli.models import _engines

    code, out, err = run_cli(capsys, "models", "info", saved("olmo2")[1])
    assert code == 0, err
    assert [line.split(None, 1)[1] for line in out.splitlines() if line.startswith("engines")] == ["mlx, torch"]
    assert _engines("opt") == "torch (the MLX engine has no opt row)"
    assert _engines("no_such_model").startswith("none (no MLX row for no_such_model")


@pytest.mark.parametrize("row", [r for r in ROWS if r != "llama-dynamic"])  # dynamic NTK reads the packed length
def test_packed_rows_equal_separate_rows(saved, row):
    """Packed documents (per-token positions and segments) give each document's own hidden states."""
    model = ours(saved(row)[1])
    a, b = mx.array([[5, 9, 11, 40, 7, 3, 8, 21]]), mx.array([[17, 6, 90, 33, 12, 2, 44, 51, 60, 70]])
    segments = mx.array([[0] * 8 + [1] * 10])
    positions = mx.array([list(range(8)) + list(range(10))])
    packed = model.hidden(mx.concatenate([a, b], axis=1), segments, positions)
    assert mx.abs(packed[:, :8] - model.hidden(a)).max().item() <= TOL
    assert mx.abs(packed[:, 8:] - model.hidden(b)).max().item() <= TOL
