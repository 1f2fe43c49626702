"""Gemma 3 image-text checkpoints (`gemma3`, Gemma3ForConditionalGeneration) train on the MLX engine
as their text model.

A tiny random model that transformers itself builds and saves (text weights as
`language_model.model.*` beside `vision_tower.*` and `multi_modal_projector.*`; norm gains perturbed,
rows longer than the sliding window): float32 logits within 1e-4 of transformers on text-only ids,
cached decoding and greedy generation equal, the other spelling (`model.language_model.*`) loading
alike, the checked loader refusing a missing or misshapen language-model tensor while never asking for
the vision tensors, `ft models info` naming both engines, a LoRA run through `--backend mlx` lowering
the loss, `ft fuse` writing a Gemma3ForConditionalGeneration with the adapter's logits and the image
model untouched, and the PEFT export loading in peft on that class with the same logits.
"""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
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
from model_factory import copy_files
from peft import PeftModel
from safetensors.numpy import load_file, save_file
from transformers import Gemma3Config, Gemma3ForConditionalGeneration

import finetune
from finetune.core import architectures, convert
from finetune.engines.mlx import lora as lora_modules
from finetune.engines.mlx.generate import generate
from finetune.engines.mlx.model import build
from finetune.errors import UserError

TOL = 1e-4
TEXTS = [f"SELECT name FROM users WHERE id = {i}; hello world {i}" for i in range(10)]
TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=128, sliding_window=6, query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            bos_token_id=0, eos_token_id=1, pad_token_id=0)
VISION = dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
              num_attention_heads=2, image_size=28, patch_size=14)
LANGUAGE, VISION_TOWER = "language_model.model.", ("vision_tower.", "multi_modal_projector.")


def build_gemma3(vocab: int, tied: bool = True, seed: int = 0) -> Gemma3ForConditionalGeneration:
    """transformers' image-text Gemma 3, order-one weights, (1 + w) norm gains perturbed away from 1."""
    config = Gemma3Config(text_config=TEXT | {"vocab_size": vocab}, vision_config=VISION, mm_tokens_per_image=4,
                          tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.12)
    return model


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "bpe")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tok):
    """tied -> (transformers model, its saved directory with the tokenizer), built once."""
    cache: dict[bool, tuple] = {}

    def get(tied: bool = True):
        if tied not in cache:
            hf = build_gemma3(tok[1], tied)
            directory = tmp_path_factory.mktemp("gemma3") / "model"
            hf.save_pretrained(directory)
            copy_files(tok[0], directory)
            cache[tied] = (hf, directory)
        return cache[tied]

    return get


def ids_of(vocab: int, batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(2, vocab, size=(batch, length))


def rewrite(source, target, change) -> None:
    """A copy of model directory `source` whose tensors are `change(tensors)`."""
    copy_files(source, target)
    save_file(change(load_file(source / "model.safetensors")), target / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("tied", [True, False])
def test_text_model_matches_transformers_logits_cache_and_greedy_generation(saved, tok, tied):
    hf, directory = saved(tied)
    stored = load_file(directory / "model.safetensors")
    assert any(k.startswith(VISION_TOWER) for k in stored) and any(k.startswith(LANGUAGE) for k in stored)
    model = ours(directory)
    ids = ids_of(tok[1], 2, 20)  # longer than the window of 6
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(ids)).logits.numpy()
    mine = np.array(model(mx.array(ids)))
    assert np.abs(mine - theirs).max() <= TOL
    assert np.abs(theirs).max() > 1.0

    full = model(mx.array(ids))
    cache = model.make_cache()
    steps = [model(mx.array(ids[:, :9]), cache=cache)] + [model(mx.array(ids[:, t: t + 1]), cache=cache)
                                                         for t in range(9, 20)]
    assert mx.abs(mx.concatenate(steps, axis=1) - full).max().item() <= TOL

    prompt = [int(i) for i in ids[0, :12]]
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert list(generate(model, prompt, max_tokens=6)) == out[0, len(prompt):].tolist()


@pytest.mark.parametrize("tied", [True, False])
def test_our_names_are_transformers_module_names_of_the_text_model(saved, tied):
    """The registry's table = the MLX module's parameters = what peft and the torch engine see."""
    hf, directory = saved(tied)
    config = json.loads((directory / "config.json").read_text())
    model = build(config)
    theirs = {n for n, _ in hf.named_parameters(remove_duplicate=False) if not n.startswith("model.vision_tower.")
              and not n.startswith("model.multi_modal_projector.") and not (tied and n == "lm_head.weight")}
    assert set(dict(tree_flatten(model.parameters()))) == set(convert.expected_shapes("gemma3", config)) == theirs
    assert lora_modules.layers_prefix(model) == architectures.REGISTRY["gemma3"].blocks == "model.language_model.layers"


def test_both_spellings_of_the_text_model_load_alike(saved, tmp_path):
    """transformers 5 saves `language_model.model.*`; its module names (`model.language_model.*`,
    `model.vision_tower.*`) are the other spelling checkpoints carry."""
    directory = saved()[1]
    renamed = tmp_path / "renamed"
    rewrite(directory, renamed, lambda t: {
        ("model.language_model." + k.removeprefix(LANGUAGE) if k.startswith(LANGUAGE) else "model." + k): v
        for k, v in t.items()})
    assert max_diff(mlx_logits(ours(renamed)), mlx_logits(ours(directory))) == 0.0


def test_the_checked_loader_wants_every_language_tensor_and_no_vision_tensor(saved, tmp_path):
    directory = saved()[1]
    gone = f"{LANGUAGE}layers.1.mlp.up_proj.weight"
    rewrite(directory, tmp_path / "missing", lambda t: {k: v for k, v in t.items() if k != gone})
    with pytest.raises(UserError, match=rf"missing keys 1: {gone.replace('.', '[.]')}"):
        finetune.load(str(tmp_path / "missing"))
    rewrite(directory, tmp_path / "shape", lambda t: t | {gone: t[gone][:, :-1]})
    with pytest.raises(UserError, match=r"shape mismatch for .*layers.1.mlp.up_proj.weight"):
        finetune.load(str(tmp_path / "shape"))
    # mlx-lm's own gemma3 conversions drop the image model: the text model is all the loader needs.
    rewrite(directory, tmp_path / "text", lambda t: {k: v for k, v in t.items() if not k.startswith(VISION_TOWER)})
    assert max_diff(mlx_logits(ours(tmp_path / "text")), mlx_logits(ours(directory))) == 0.0


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
        total += nn.losses.cross_entropy(model(ids[:, :-1]), ids[:, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return total / count


def test_models_info_names_both_engines_and_mlx_trains_it(saved, text_data, tmp_path, capsys):
    base = saved()[1]
    code, out, err = run_cli(capsys, "models", "info", base)
    assert code == 0, err
    assert [line.split(None, 1)[1] for line in out.splitlines() if line.startswith("engines")] == ["mlx, torch"]
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "start", base, text_data, "--backend", "mlx", "--iters", "4",
                           "--batch-size", "8", "--learning-rate", "5e-3", "--eval-every", "0", "--output", run)
    assert code == 0, err
    before, after = text_loss(base), text_loss(base, run)
    assert after < before - 0.05, (before, after)
    # mlx-lm's gemma3 keeps the text model at `language_model.model`: the adapter file names its blocks so.
    assert all(k.startswith("language_model.model.layers.") for k in load_file(run / "adapters.safetensors"))


def test_the_torch_engine_adapts_the_text_model_not_the_vision_tower(saved, text_data, tmp_path, capsys):
    """Its blocks are the registry's (`model.language_model.layers`), though the vision tower's come first."""
    base = saved()[1]
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "start", base, text_data, "--backend", "torch", "--iters", "4",
                           "--batch-size", "8", "--learning-rate", "5e-3", "--eval-every", "0", "--output", run)
    assert code == 0, err
    names = load_file(run / "adapters.safetensors")
    assert len(names) == 2 * 3 * 7 and all(k.startswith("language_model.model.layers.") for k in names)
    assert text_loss(base, run) < text_loss(base) - 0.05  # the MLX engine reads the torch engine's adapter


@pytest.fixture(scope="module")
def adapted(saved, tmp_path_factory):
    """(base, an all-linear random adapter on it, our logits with the adapter)."""
    base = saved()[1]
    adapter = random_adapter(base, tmp_path_factory.mktemp("adapter") / "a", rank=4, scale=2.0)
    expected = mlx_logits(ours(base, adapter))
    assert max_diff(expected, mlx_logits(ours(base))) > 0.1  # the adapter matters
    return base, adapter, expected


@pytest.mark.parametrize("backend", ["mlx", "torch"])  # which engine's libraries run fuse's own logit check
def test_fuse_writes_the_image_text_model_with_the_adapter(adapted, tmp_path, capsys, backend):
    base, adapter, expected = adapted
    fused = tmp_path / "fused"
    code, _, err = run_cli(capsys, "fuse", base, "--adapter", adapter, "--output", fused, "--backend", backend)
    assert code == 0, err
    model = Gemma3ForConditionalGeneration.from_pretrained(fused).eval()
    assert max_diff(torch_logits(model), expected) <= TOL
    before, after = load_file(base / "model.safetensors"), load_file(fused / "model.safetensors")
    assert before.keys() == after.keys()  # transformers' own spelling, the image model included
    assert all(np.array_equal(before[k], after[k]) for k in before if k.startswith(VISION_TOWER))
    config, original = (json.loads((d / "config.json").read_text()) for d in (fused, base))
    assert config["architectures"] == ["Gemma3ForConditionalGeneration"]
    assert {k: config[k] for k in ("model_type", "text_config", "vision_config", "mm_tokens_per_image")} == {
        k: original[k] for k in ("model_type", "text_config", "vision_config", "mm_tokens_per_image")}


def test_peft_export_adapts_the_language_model_of_the_image_text_class(adapted, tmp_path, capsys):
    base, adapter, expected = adapted
    peft_dir = tmp_path / "peft"
    code, _, err = run_cli(capsys, "adapters", "export", adapter, "--format", "peft", "--output", peft_dir)
    assert code == 0, err
    theirs = PeftModel.from_pretrained(Gemma3ForConditionalGeneration.from_pretrained(base), peft_dir).eval()
    assert max_diff(torch_logits(theirs), expected) <= TOL
    adapted_modules = [n for n, m in theirs.named_modules() if hasattr(m, "lora_A")]
    assert len(adapted_modules) == 3 * 7
    assert all(n.startswith("base_model.model.model.language_model.layers.") for n in adapted_modules)
    back = tmp_path / "back"
    code, _, err = run_cli(capsys, "adapters", "import", peft_dir, "--output", back)
    assert code == 0, err
    assert max_diff(mlx_logits(ours(base, back)), expected) == 0.0


def test_mlx_lm_reads_our_adapter_and_we_read_its_quantized_gemma3(adapted, tmp_path, capsys):
    """mlx-lm's gemma3 (the text model at `language_model.model`) loads our adapter with our logits,
    and its own quantized conversion loads here with its logits, and fuses back in its layout."""
    import mlx_lm

    base, adapter, expected = adapted
    theirs = tmp_path / "theirs"
    copy_files(base, theirs)
    config = json.loads((base / "config.json").read_text())
    # mlx-lm reads the vocabulary at the top (default 262208) and the window pattern, not layer_types.
    config["vocab_size"] = config["text_config"]["vocab_size"]
    config["text_config"]["sliding_window_pattern"] = 2
    (theirs / "config.json").write_text(json.dumps(config))
    model, _ = mlx_lm.load(str(theirs), adapter_path=str(adapter))
    assert max_diff(mlx_logits(model), expected) <= 1e-5

    for recipe in ("4-bit", "mixed_3_6"):  # mixed: per-layer entries named `language_model.model.layers...`
        quantized = tmp_path / recipe
        mlx_lm.convert(str(theirs), mlx_path=str(quantized), quantize=True, q_group_size=32, q_bits=4,
                       quant_predicate=None if recipe == "4-bit" else recipe)
        assert max_diff(mlx_logits(ours(quantized)), mlx_logits(mlx_lm.load(str(quantized))[0])) <= 1e-5
        fused = tmp_path / f"{recipe}-fused"
        code, _, err = run_cli(capsys, "fuse", quantized, "--adapter", adapter, "--output", fused)
        assert code == 0, err
        assert load_file(fused / "model.safetensors").keys() == load_file(quantized / "model.safetensors").keys()
        layers = [k for k in json.loads((fused / "config.json").read_text())["quantization"]
                  if k not in ("group_size", "bits", "mode")]  # per-layer entries, as mlx-lm names modules
        assert all(k.startswith("language_model.model.") for k in layers) and bool(layers) == (recipe != "4-bit")
        assert max_diff(mlx_logits(ours(fused)), mlx_logits(mlx_lm.load(str(fused))[0])) <= 1e-5
