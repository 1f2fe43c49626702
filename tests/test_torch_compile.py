"""The torch engine under torch.compile trains what it trains eagerly, on any padded length.

A 2-layer Llama (hidden 64) keeps each compilation to seconds; the compiled graph is dynamic in
the batch's length, so the lengths of one run share it.
"""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch
from hf_models import build_hf, save_hf
from model_factory import copy_files
from safetensors.numpy import load_file

from finetune.core import batching
from finetune.core.config import Recipe
from finetune.core.tokenize import Tokens
from finetune.engines.torch import step as ttrain
from finetune.files.tokenizer import load_tokenizer
from finetune.shell.training import run as torch_run

torch.set_num_threads(1)  # the test machine's cores are shared


@pytest.fixture(scope="module")
def small_model(tmp_path_factory, tokenizer_dir) -> Path:
    lm = build_hf("llama-tied")
    lm.resize_token_embeddings(len(load_tokenizer(tokenizer_dir)))
    directory = save_hf(lm, tmp_path_factory.mktemp("models") / "llama")
    copy_files(tokenizer_dir, directory)
    return directory


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data") / "rows"
    d.mkdir()
    for split, n in (("train", 24), ("valid", 4)):
        # Rows of different lengths, so batches come in more than one padded width.
        rows = [{"text": f"SELECT name FROM users WHERE id = {i}" + " hello world" * (i % 9)} for i in range(n)]
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def recipe(model: Path, data: Path, out: Path, compile: bool) -> Recipe:
    r = Recipe()
    return msgspec.structs.replace(
        r, output=str(out),
        model=msgspec.structs.replace(r.model, path=str(model), dtype="float32"),
        data=msgspec.structs.replace(r.data, path=str(data)),
        train=msgspec.structs.replace(r.train, iters=6, batch_size=4, learning_rate=1e-3, report_every=2,
                                      eval_every=6, val_batches=-1, save_every=6, compile=compile),
    )


def train(r: Recipe) -> torch_run.Prepared:
    prepared = torch_run.prepare_run(r, lambda line: None, engine="torch").unwrap()
    torch_run.fit(prepared, Path(r.output), False, lambda line: None).unwrap()
    return prepared


def test_compiled_training_matches_eager(tmp_path, small_model, data):
    from torch._dynamo.utils import counters

    counters.clear()
    compiled = train(recipe(small_model, data, tmp_path / "compiled", compile=True))
    assert compiled.model.compiled is not None and counters["stats"]["unique_graphs"] >= 1  # it compiled
    eager = train(recipe(small_model, data, tmp_path / "eager", compile=False))
    assert eager.model.compiled is None
    a, b = (load_file(tmp_path / d / "adapters.safetensors") for d in ("compiled", "eager"))
    assert a.keys() == b.keys()
    for k in a:  # the float32-equivalence measure between the engines (tests/test_torch_engine.py)
        rel = np.linalg.norm(a[k] - b[k]) / np.linalg.norm(b[k])
        assert rel < 1e-3, (k, rel)
    losses = [[json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("compiled", "eager")]
    for x, y in zip(*losses, strict=True):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5)
    assert losses[0][-1]["val_loss"] == pytest.approx(losses[1][-1]["val_loss"], rel=1e-5)


def test_one_graph_serves_every_padded_length_and_padding_adds_no_loss(tmp_path, small_model, data):
    """Two widths, the wider one the same rows with more padding: the same loss from one graph."""
    from torch._dynamo.utils import counters

    prepared = torch_run.prepare_run(recipe(small_model, data, tmp_path / "run", compile=True), lambda line: None,
                                     engine="torch").unwrap()
    model = prepared.model
    model.train()
    rows = [[prepared.splits["train"][i]] for i in range(4)]
    longest = max(len(t.ids) for [t] in rows)
    # A fifth row 40 tokens longer that carries no loss widens the batch by at least one bucket.
    wide = rows + [[Tokens(ids=(5,) * (longest + 40), mask=(0,) * (longest + 40))]]
    results, graphs = [], []
    for batch_rows in (rows, wide):
        b = batching.make_batch(batch_rows, 256)
        tensors = [torch.from_numpy(a.astype(np.int64)) for a in (b.inputs, b.select, b.targets)]
        if batch_rows is wide:  # the same targets; the extra row's inputs are pure padding
            assert b.inputs.shape[1] > results[0][2]
        loss, tokens = ttrain.supervised_ce(model, *tensors, torch.from_numpy(b.weights))
        results.append((loss.item(), tokens.item(), b.inputs.shape[1]))
        graphs.append((counters["stats"]["unique_graphs"], counters["frames"]["total"]))
    (narrow_loss, narrow_tokens, _), (wide_loss, wide_tokens, _) = results
    assert wide_tokens == narrow_tokens
    assert wide_loss == pytest.approx(narrow_loss, rel=1e-5)
    assert graphs[1] == graphs[0]  # dynamic from the start: the wider batch compiled nothing new


def test_without_a_compiler_training_goes_on_eagerly_with_a_note(tmp_path, small_model, data, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no c++, g++ or clang++ to be found
    prepared = train(recipe(small_model, data, tmp_path / "run", compile=True))
    assert "torch.compile on the CPU needs a C++ compiler" in capsys.readouterr().err
    assert prepared.model.compiled == prepared.model._hidden
    assert (tmp_path / "run" / "adapters.safetensors").exists()


def test_a_bfloat16_base_trains_float32_factors_to_the_float32_loss(tmp_path, small_model, data):
    """bf16 base, LoRA paths under autocast: factors and optimizer state stay float32, loss within 2%."""
    runs = {}
    for dtype in ("float32", "bfloat16"):
        r = recipe(small_model, data, tmp_path / dtype, compile=False)
        r = msgspec.structs.replace(r, model=msgspec.structs.replace(r.model, dtype=dtype))
        prepared = train(r)
        runs[dtype] = [json.loads(x) for x in (tmp_path / dtype / "metrics.jsonl").read_text().splitlines()]
    assert prepared.model.half_precision() == torch.bfloat16
    assert {p.dtype for p in prepared.model.trainable().values()} == {torch.float32}
    state = load_file(next((tmp_path / "bfloat16" / "checkpoints").glob("step-*")) / "optimizer.safetensors")
    assert {v.dtype for k, v in state.items() if k.endswith((".m", ".v"))} == {np.dtype(np.float32)}
    assert runs["bfloat16"][-1]["val_loss"] == pytest.approx(runs["float32"][-1]["val_loss"], rel=0.02)
    a, b = (load_file(tmp_path / d / "adapters.safetensors") for d in ("bfloat16", "float32"))
    rel = max(np.linalg.norm(a[k] - b[k]) / np.linalg.norm(b[k]) for k in b)
    assert rel < 0.5  # bf16's rounding moves Adam's steps (0.17 here), not their direction (~1.4)


def test_resuming_may_switch_compile_on_or_off():
    """`compile` changes how a step is computed, not what: a checkpoint resumes either way."""
    import msgspec

    from finetune.core.config import Recipe
    from finetune.shell.training import rundir

    plain = Recipe()
    compiled = msgspec.structs.replace(plain, train=msgspec.structs.replace(plain.train, compile=True))
    assert rundir.fingerprint(compiled) == rundir.fingerprint(plain)
    other = msgspec.structs.replace(plain, train=msgspec.structs.replace(plain.train, learning_rate=1.0))
    assert rundir.fingerprint(other) != rundir.fingerprint(plain)
