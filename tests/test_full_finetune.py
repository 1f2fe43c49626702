"""Full fine-tuning (`--fine-tune-type full`, mlx-lm's `full`) on both engines: the last N blocks'
every weight trains; the run saves them in mlx-lm's layout (mlx-lm loads them over the base with
our logits) and a HuggingFace model in RUN/model (transformers and mlx-lm load it with our logits);
resume, generate, eval, fuse, refusals, and the memory estimate against a measured peak.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from cli_run import error_line, run_cli
from lora_models import (
    build_hf,
    make_tokenizer,
    max_diff,
    mlx_logits,
    ours,
    reverse_rows,
    torch_logits,
    write_model,
)

from finetune.cli import main

torch.set_num_threads(1)
TOL = 1e-4  # float32 logits of two implementations


@pytest.fixture(scope="module", autouse=True)
def _module_home(module_home):
    """conftest's module_home for every fixture of this module."""


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> tuple[Path, int]:
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def base(tmp_path_factory, tok) -> Path:
    """A tiny float32 Llama with biases and a generation_config.json (the model dir copies it); rope_theta
    at its default, which mlx-lm reads from the top level only."""
    d = write_model(build_hf("llama-bias", tok[1], seed=5), tmp_path_factory.mktemp("full") / "llama", tok[0])
    assert (d / "generation_config.json").is_file()
    return d


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    for name, rows in (("train", reverse_rows(32)), ("valid", reverse_rows(4, 32))):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def _train(base: Path, data: Path, out: Path, *extra: str, dtype: str = "float32", iters: str = "4",
           kind: str = "full") -> Path:
    argv = ["train", "start", str(base), str(data), "--fine-tune-type", kind, "--iters", iters, "--batch-size", "4",
            "--learning-rate", "1e-3", "--save-every", "2", "--eval-every", "0", "--report-every", "1",
            "--dtype", dtype, "--output", str(out), *extra]
    assert main(argv) == 0
    return out


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["train_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def mlx_run(tmp_path_factory, base, data) -> Path:
    return _train(base, data, tmp_path_factory.mktemp("runs") / "mlx", "--lora-layers", "1")


@pytest.fixture(scope="module")
def torch_run(tmp_path_factory, base, data) -> Path:
    return _train(base, data, tmp_path_factory.mktemp("runs") / "torch", "--lora-layers", "1", "--backend", "torch")


def test_a_full_run_saves_the_last_blocks_weights_in_mlx_lms_layout(mlx_run, base):
    config = json.loads((mlx_run / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "full" and config["num_layers"] == 1
    tensors = mx.load(str(mlx_run / "adapters.safetensors"))
    assert tensors and all(k.startswith("model.layers.1.") for k in tensors)  # the last block, every weight
    assert {"model.layers.1.self_attn.q_proj.weight", "model.layers.1.input_layernorm.weight",
            "model.layers.1.mlp.down_proj.weight"} <= set(tensors)
    import mlx_lm
    from mlx.utils import tree_flatten

    theirs = dict(tree_flatten(mlx_lm.load(str(base))[0].layers[1].parameters()))
    assert set(tensors) == {f"model.layers.1.{k}" for k in theirs}
    assert all(not np.array_equal(np.array(tensors[f"model.layers.1.{k}"]), np.array(v)) for k, v in theirs.items()
               if k.endswith("proj.weight"))  # trained


def test_mlx_lm_loads_a_full_run_over_the_base_with_our_logits(mlx_run, base):
    import mlx_lm

    theirs, _ = mlx_lm.load(str(base), adapter_path=str(mlx_run))
    mine = mlx_logits(ours(base, mlx_run))
    assert max_diff(mine, mlx_logits(theirs)) <= TOL
    assert max_diff(mine, mlx_logits(ours(base))) > 1e-2  # the training changed the model


@pytest.mark.parametrize("fixture", ["mlx_run", "torch_run"])
def test_the_run_saves_a_hf_model_that_transformers_and_mlx_lm_load_with_our_logits(request, fixture, base):
    import mlx_lm
    from transformers import AutoModelForCausalLM

    run = request.getfixturevalue(fixture)
    model = run / "model"
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {p.name for p in model.iterdir()}
    assert json.loads((model / "config.json").read_text())["dtype"] == "float32"
    mine = mlx_logits(ours(base, run))
    hf = AutoModelForCausalLM.from_pretrained(model, dtype="float32").eval()
    assert max_diff(torch_logits(hf), mine) <= TOL
    assert max_diff(mlx_logits(mlx_lm.load(str(model))[0]), mine) <= TOL
    assert max_diff(mlx_logits(ours(model)), mine) <= TOL


def test_both_engines_train_the_same_full_fine_tune(mlx_run, torch_run, base):
    """Same recipe, same batches, same optimizer: the losses agree to float32 rounding, and so do
    the models they saved."""
    a, b = _losses(mlx_run), _losses(torch_run)
    assert len(a) == len(b) == 4
    for x, y in zip(a, b, strict=True):
        assert abs(x - y) < 1e-4 * y, (a, b)
    assert max_diff(mlx_logits(ours(base, mlx_run)), mlx_logits(ours(base, torch_run))) <= 1e-3


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_generate_and_eval_load_a_full_run_over_the_base(tmp_path, capsys, mlx_run, base, data, backend):
    code, out, err = run_cli(capsys, "generate", base, "--adapter", mlx_run, "--prompt", "Q: reverse abc\nA: ",
                             "--max-tokens", "6", "--backend", backend)
    assert code == 0, err
    code, out, err = run_cli(capsys, "eval", base, data, "--split", "valid", "--adapter", mlx_run,
                             "--metric", "loss", "--backend", backend)
    assert code == 0, err
    assert "base" in out and mlx_run.name in out, out


def test_a_resumed_full_run_is_bit_identical(tmp_path, base, data, mlx_run, torch_run):
    for whole, extra in ((mlx_run, ("--lora-layers", "1")), (torch_run, ("--lora-layers", "1", "--backend", "torch"))):
        cut = tmp_path / whole.name
        shutil.copytree(whole, cut)
        shutil.rmtree(cut / "checkpoints" / "step-0000004")
        shutil.rmtree(cut / "model")
        (cut / "adapters.safetensors").unlink()
        _train(base, data, cut, *extra, "--resume")
        assert (cut / "adapters.safetensors").read_bytes() == (whole / "adapters.safetensors").read_bytes()
        opt_whole, opt_cut = (mx.load(str(d / "checkpoints/step-0000004/optimizer.safetensors")) for d in (whole, cut))
        assert opt_whole.keys() == opt_cut.keys() and any(k.endswith("q_proj.weight.v") for k in opt_whole)
        assert all(mx.array_equal(opt_whole[k], opt_cut[k]).item() for k in opt_whole)
        assert (cut / "model" / "model.safetensors").read_bytes() == (whole / "model" / "model.safetensors").read_bytes()


def test_ft_fuse_writes_the_runs_model_and_peft_export_is_refused(tmp_path, capsys, mlx_run, base):
    out = tmp_path / "fused"
    code, stdout, err = run_cli(capsys, "fuse", base, "--adapter", mlx_run, "--output", out)
    assert code == 0, err
    assert "full fine-tune" in stdout
    assert (out / "model.safetensors").read_bytes() == (mlx_run / "model" / "model.safetensors").read_bytes()
    for argv in (("adapters", "export", mlx_run, "--format", "peft", "--output", tmp_path / "peft"),
                 ("export", mlx_run, "--format", "gguf-adapter", "--output", tmp_path / "a.gguf")):
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and "full fine-tune" in error_line(err) and "no LoRA, PEFT or GGUF-adapter form" in error_line(err)
    assert not (tmp_path / "peft").exists() and not (tmp_path / "a.gguf").exists()


@pytest.mark.parametrize("fixture", ["mlx_run", "torch_run"])
def test_ft_adapters_inspect_describes_a_full_run_and_checks_it_against_a_base(request, tmp_path, capsys, base, tok,
                                                                               fixture):
    run = request.getfixturevalue(fixture)
    code, out, err = run_cli(capsys, "adapters", "inspect", run, "--model", base, "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert rows["format"].startswith("FineTune run directory, full fine-tune") and rows["fine-tune_type"].startswith("full")
    assert rows["layers"].startswith("1 (1 layers); num_layers 1") and "self_attn.q_proj" in rows["trained"]
    tensors = mx.load(str(run / "adapters.safetensors"))
    assert rows["parameters"] == f"{sum(t.size for t in tensors.values()):,}"
    assert rows["model_folder"] == f"{run / 'model'} (a HuggingFace model)" and rows[f"fits_{base}"] == "yes"
    code, out, _ = run_cli(capsys, "adapters", "inspect", run / "checkpoints" / "step-0000002")
    assert code == 0 and "step 2 of run" in out and "full (trained weights, not LoRA factors)" in out
    other = write_model(build_hf("llama", tok[1], seed=5), tmp_path / "no-bias", tok[0])  # no q/k/v biases
    code, out, err = run_cli(capsys, "adapters", "inspect", run, "--model", other)
    assert code == 2 and f"does not fit {other}" in error_line(err) and ".bias" in error_line(err), err
    assert "Traceback" not in err and "fits " in out


@pytest.mark.parametrize(("extra", "field"), [
    (("--quantize-bits", "8"), "quantize_bits"),
    (("--lora-keys", "self_attn.q_proj"), "keys"),
    (("--dropout", "0.1"), "dropout"),
    (("--lora-layers", "3"), "num_layers"),
])
def test_what_a_full_fine_tune_cannot_do_is_refused_in_one_line(tmp_path, capsys, base, data, extra, field):
    for backend in ("mlx",) if field == "quantize_bits" else ("mlx", "torch"):  # torch: no quantized bases at all
        out = tmp_path / backend
        code, _, err = run_cli(capsys, "train", "start", base, data, "--fine-tune-type", "full", "--iters", "1",
                               "--output", out, "--backend", backend, *extra)
        assert code == 2 and (f"$.lora.{field}" in error_line(err) or f"$.model.{field}" in error_line(err)), err
        assert "Traceback" not in err and not (out / "adapters.safetensors").exists()


def test_an_mlx_lm_quantized_checkpoint_is_refused_for_full(tmp_path, capsys, base, data):
    from mlx_lm.convert import convert

    q = tmp_path / "q8"
    convert(str(base), str(q), quantize=True, q_bits=8, q_group_size=32)
    code, _, err = run_cli(capsys, "train", "start", q, data, "--fine-tune-type", "full", "--iters", "1",
                           "--output", tmp_path / "run")
    assert code == 2 and "quantized checkpoint" in error_line(err) and "cannot be trained in full" in error_line(err)
    assert not (tmp_path / "run" / "adapters.safetensors").exists()


def _measured_peak(config: dict, recipe, seq: int, steps: int = 2) -> int:
    """Peak bytes of `steps` real full fine-tune steps (the one loop, the MLX engine's step)."""
    import gc

    import mlx.optimizers as optim
    from memory_runs import rows
    from mlx.utils import tree_flatten

    from finetune.core import batching
    from finetune.engines.mlx import step
    from finetune.engines.mlx.full import unfreeze
    from finetune.engines.mlx.model import build
    from finetune.engines.protocol import Data
    from finetune.shell.training import loop
    from finetune.shell.training.rundir import Cursor

    gc.collect()
    mx.clear_cache()
    t = recipe.train
    model = build(config)
    model.load_weights([(k, mx.random.normal(v.shape, key=mx.random.key(i)) * 0.1 if v.ndim > 1 else mx.ones(v.shape))
                        for i, (k, v) in enumerate(tree_flatten(model.parameters()))])
    unfreeze(model, recipe.lora.num_layers)
    mx.eval(model.parameters())
    mx.reset_peak_memory()
    examples = rows(t.batch_size * steps, seq, 0.5, config["vocab_size"])
    data = Data(examples, batching.length_sorted([len(e.ids) for e in examples], t.batch_size))
    optimizer = optim.AdamW(learning_rate=t.learning_rate)
    optimizer.init(model.trainable_parameters())
    with step.checkpointed(model, t.grad_checkpoint):
        loop.run_steps(step.Trainer(model, optimizer, t), data, None, t, steps, Cursor(),
                       on_report=lambda r: None, on_save=lambda c: None, on_log=lambda line: None)
    return mx.get_peak_memory()


@pytest.mark.parametrize(("batch", "seq", "checkpoint", "layers"), [(4, 256, False, 2), (2, 512, True, -1), (8, 128, False, 1)])
def test_the_memory_estimate_of_a_full_fine_tune_is_within_25_percent_of_the_measured_peak(batch, seq, checkpoint, layers):
    """Weights, their gradients and Adam state, and the activations of the trained blocks only."""
    import math

    import msgspec
    from model_factory import llama_config

    from finetune.core import memory, modelinfo
    from finetune.core.config import Recipe

    config = {**llama_config(4000), "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4}
    r = msgspec.convert({"lora": {"fine_tune_type": "full", "num_layers": layers}, "train": {
        "batch_size": batch, "iters": 1, "grad_checkpoint": checkpoint, "max_seq_length": 1024, "eval_every": 0}}, Recipe)
    peak = _measured_peak(config, r, seq)
    chosen = 64 * math.ceil(batch * int(seq * 0.5) / 64)  # make_batch pads the selection to 64
    est = memory.estimate(modelinfo.facts(config).unwrap(), r, seq, supervised=chosen)
    assert abs(est.total_gb * memory.GB / peak - 1) <= 0.25, (est, peak / memory.GB)
    assert est.lora_gb > 0.5 * est.weights_gb * (1 if layers < 0 else layers / 4)  # gradients + Adam state counted


def test_the_memory_plan_counts_what_a_full_run_trains(mlx_run, capsys, base, data, tmp_path):
    """The estimate's trainable count is the run's saved weights; the start lines say full."""
    from finetune.core import memory, modelinfo
    from finetune.shell import recipes

    recipe = recipes.load(mlx_run / "recipe.toml").unwrap()
    facts = modelinfo.facts(json.loads((base / "config.json").read_text())).unwrap()
    tensors = mx.load(str(mlx_run / "adapters.safetensors"))
    trained = sum(v.size for v in tensors.values())  # the final norm's weights are counted in the blocks' share
    assert 0 <= memory.trainable_parameters(facts, recipe) - trained <= facts.hidden_size
    code, out, err = run_cli(capsys, "train", "start", base, data, "--fine-tune-type", "full", "--iters", "1",
                             "--memory-limit", "8", "--output", tmp_path / "run")
    assert code == 0, err
    assert "trained weights (full fine-tune): their gradients and Adam state" in out
    assert f"Training {trained * 2:,} of the base's parameters (full fine-tune)" in out


def test_gpt2_conv1d_weights_train_alike_on_both_engines_and_load_everywhere(tmp_path, tok, data):
    """GPT-2 stores its linears as Conv1D (transposed): the torch engine flips them (and their Adam
    moments) into the MLX engine's layout, so both engines save the same tensors under mlx-lm's names."""
    import mlx_lm
    from transformers import AutoModelForCausalLM

    gpt2 = write_model(build_hf("gpt2", tok[1], seed=2), tmp_path / "gpt2", tok[0])
    runs = [_train(gpt2, data, tmp_path / backend, "--backend", backend)
            for backend in ("mlx", "torch")]
    a, b = (_losses(r) for r in runs)
    assert all(abs(x - y) < 1e-4 * y for x, y in zip(a, b, strict=True)), (a, b)
    tensors = [mx.load(str(r / "adapters.safetensors")) for r in runs]
    assert tensors[0].keys() == tensors[1].keys() and "model.h.1.attn.c_attn.weight" in tensors[0]
    assert all(tensors[0][k].shape == tensors[1][k].shape for k in tensors[0])
    moments = [mx.load(str(r / "checkpoints/step-0000004/optimizer.safetensors")) for r in runs]
    key = "transformer.h.0.mlp.c_fc.weight.v"
    assert moments[0][key].shape == moments[1][key].shape == (256, 64)  # (out, in): ours, not Conv1D's
    mine = mlx_logits(ours(gpt2, runs[1]))  # (mlx-lm reads only the hub's bare GPT-2 names: RUN/model has them)
    hf = AutoModelForCausalLM.from_pretrained(runs[1] / "model", dtype="float32").eval()
    assert max_diff(torch_logits(hf), mine) <= TOL
    assert max_diff(mlx_logits(mlx_lm.load(str(runs[0] / "model"))[0]), mlx_logits(ours(gpt2, runs[0]))) <= TOL
    assert max_diff(mine, mlx_logits(ours(gpt2))) > 1e-2


def test_gpt2_lora_trains_alike_on_both_engines(tmp_path, tok, data):
    """GPT-2 checkpoints carry their own dropout (0.1): the torch engine switches it off for LoRA as
    for full runs (the MLX engine and mlx-lm have none), so both engines train the same function."""
    gpt2 = write_model(build_hf("gpt2", tok[1], seed=2), tmp_path / "gpt2", tok[0])
    a, b = (_losses(_train(gpt2, data, tmp_path / backend, "--backend", backend, kind="lora"))
            for backend in ("mlx", "torch"))
    assert all(abs(x - y) < 1e-4 * y for x, y in zip(a, b, strict=True)), (a, b)


def test_a_bfloat16_base_trains_float32_blocks_on_the_torch_engine(tmp_path, base, data):
    """The frozen parts stay bfloat16; the trained blocks and their Adam state are float32, so
    learning-rate-sized steps are not rounded away."""
    run = _train(base, data, tmp_path / "bf16", "--backend", "torch", "--lora-layers", "1", dtype="bfloat16")
    tensors = mx.load(str(run / "adapters.safetensors"))
    assert all(v.dtype == mx.float32 for v in tensors.values())
    opt = mx.load(str(run / "checkpoints/step-0000004/optimizer.safetensors"))
    assert opt["model.layers.1.mlp.up_proj.weight.v"].dtype == mx.float32
    before = mx.load(str(base / "model.safetensors"))
    moved = [float(mx.abs(tensors[k] - before[k]).max()) for k in tensors if k.endswith("proj.weight")]
    assert min(moved) > 1e-4  # every trained matrix moved
    assert all(np.isfinite(_losses(run)))


def test_the_server_refuses_a_full_run_beside_the_base_and_leaves_the_base_untouched(mlx_run, base):
    from finetune.shell.serve.engines import make

    engine = make("mlx")
    engine.load(str(base), None, "").unwrap()
    before = mlx_logits(engine.net)
    refused = engine.prepare(str(mlx_run))
    assert "full fine-tune" in refused.failure() and f"ft serve {mlx_run}/model" in refused.failure()
    assert max_diff(mlx_logits(engine.net), before) == 0.0


@pytest.mark.parametrize("row", ["qwen3", "gemma3_text", "phi3", "olmo2", "gpt_neox"])
def test_other_architectures_save_a_model_transformers_loads_with_our_logits(tmp_path, tok, data, row):
    """Registry rows with q/k norms, offset norms, fused projections, parallel blocks: the run's
    weights over the base in FineTune, and RUN/model in transformers, agree."""
    from test_architectures import build_row
    from transformers import AutoModelForCausalLM

    hf = build_row(row, tok[1])
    base = write_model(hf, tmp_path / row, tok[0])
    run = _train(base, data, tmp_path / "run", "--lora-layers", "1", "--max-seq-length", "32", iters="2")
    mine = mlx_logits(ours(base, run))
    saved = AutoModelForCausalLM.from_pretrained(run / "model", dtype="float32", attn_implementation="eager").eval()
    assert max_diff(torch_logits(saved), mine) <= TOL
    assert max_diff(mine, torch_logits(hf)) > 1e-3  # trained


def test_an_architecture_only_torch_trains_saves_its_model_too(tmp_path, data):
    """OPT has no MLX row: the torch engine trains it in full under transformers' names, and RUN/model
    is the base checkpoint with those tensors replaced (transformers' logits = the torch engine's)."""
    from transformers import AutoModelForCausalLM, OPTConfig, OPTForCausalLM

    from finetune.engines.torch.load import load
    from finetune.files.tiny import ensure_tiny

    base = tmp_path / "opt"
    torch.manual_seed(0)
    OPTForCausalLM(OPTConfig(vocab_size=2048, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                             word_embed_proj_dim=64, max_position_embeddings=256, bos_token_id=0, eos_token_id=1)
                   ).save_pretrained(base)
    for f in ensure_tiny().iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, base / f.name)
    run = _train(base, data, tmp_path / "run", "--backend", "torch", "--lora-layers", "1", iters="2")
    assert all(k.startswith("model.decoder.layers.1.") for k in mx.load(str(run / "adapters.safetensors")))
    mine, _ = load(str(base), str(run), torch.device("cpu")).unwrap()
    saved = AutoModelForCausalLM.from_pretrained(run / "model", dtype="float32").eval()
    plain = AutoModelForCausalLM.from_pretrained(base, dtype="float32").eval()
    assert max_diff(torch_logits(saved), torch_logits(mine.eval())) <= TOL
    assert max_diff(torch_logits(saved), torch_logits(plain)) > 1e-3


def test_ft_export_gguf_of_a_full_run_writes_its_model(tmp_path, capsys, mlx_run):
    from gguf import GGUFReader

    out = tmp_path / "full.gguf"
    code, stdout, err = run_cli(capsys, "export", mlx_run, "--format", "gguf", "--output", out)
    assert code == 0, err
    names = {t.name for t in GGUFReader(str(out)).tensors}
    assert "blk.1.attn_q.weight" in names and "token_embd.weight" in names
