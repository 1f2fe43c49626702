"""`--memory-limit` on the torch engine: the plan made before the weights load (on the engine's own
estimate plus what the process holds), plan.json, a measured peak under the limit, the same
optimisation in micro-steps (LoRA and full fine-tuning), refusals in one line, and the loop lowering the micro-batch at run time."""

from __future__ import annotations

import json
import shutil

import msgspec
import numpy as np
import pytest
import torch
from cli_run import error_line, run_cli
from safetensors.numpy import load_file

from finetune.core import memory, memplan
from finetune.core.config import Recipe
from finetune.engines import protocol
from finetune.engines.torch import budget
from finetune.engines.torch import lora as tmodel
from finetune.engines.torch import step as ttrain
from finetune.engines.torch.load import load_base
from finetune.files.tokenizer import load_tokenizer
from finetune.shell.data import check
from finetune.shell.training import loop, rundir

torch.set_num_threads(1)  # agents share two cores here
CPU = torch.device("cpu")
WORDS = ("select", "name", "from", "users", "where", "age", "order", "by", "price", "hello", "world", "city")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir):
    """A Llama wide enough that activations, not the process, decide the split (written by transformers)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(load_tokenizer(tokenizer_dir)),
                         max_position_embeddings=512, tie_word_embeddings=True)
    d = tmp_path_factory.mktemp("models") / "llama"
    LlamaForCausalLM(config).save_pretrained(d)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, d / f.name)
    return d


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data") / "long"
    d.mkdir()
    rows = [{"text": " ".join(WORDS[(7 * i + 5 * k) % len(WORDS)] for k in range(300))} for i in range(16)]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def recipe(model_dir, data, seq: int = 256) -> Recipe:
    return msgspec.convert({"model": {"path": str(model_dir), "dtype": "float32"}, "data": {"path": str(data)},
                            "lora": {"dropout": 0.0},
                            "train": {"batch_size": 8, "iters": 2, "learning_rate": 1e-3, "eval_every": 0,
                                      "save_every": 0, "report_every": 1, "max_seq_length": seq}}, Recipe)


def estimate_gb(r: Recipe, splits: int) -> float:
    """The torch estimate (without the process) of the run's largest micro-step at `splits`."""
    inspection = check.inspect(r).unwrap()
    rr, train = inspection.report.recipe, inspection.tokens["train"]
    work = memplan.workload(protocol.plan(train, rr), train, rr.train.max_seq_length)
    rows, width, chosen = memplan.micro_shape(work, splits)
    est = memory.estimate(inspection.report.facts, rr, width, "float32", chosen, rows, copies=budget.COPIES,
                          trained_dtype=budget.TRAINED, activation_bytes=budget.activation_bytes("float32"))
    return est.total_gb + budget.FIXED_GB


def start(capsys, model_dir, data, out, *extra, seq: int = 256):
    return run_cli(capsys, "train", "start", model_dir, data, "--backend", "torch", "--batch-size", 8, "--iters", 2,
                   "--learning-rate", 1e-3, "--eval-every", 0, "--max-seq-length", seq, "--dtype", "float32",
                   "--output", out, *extra)


def test_a_planned_run_stays_under_its_limit_with_the_same_result(tmp_path, capsys, model_dir, data):
    r = recipe(model_dir, data)
    whole, half = estimate_gb(r, 1), estimate_gb(r, 2)
    assert half < whole
    budget.reset_peak(CPU)
    limit = budget.process_gb(CPU) + (whole + half) / 2  # room for half a batch at once, not a whole one
    code, out, err = start(capsys, model_dir, data, tmp_path / "split", "--memory-limit", limit)
    assert code == 0, err
    assert "memory plan: 2 micro-steps of ≤4 rows per batch of 8" in out + err
    plan = json.loads((tmp_path / "split" / "plan.json").read_text())
    assert plan["engine"] == "torch" and plan["splits"] == 2 and plan["effective_batch"] == 8
    assert plan["estimate"]["total_gb"] <= limit
    assert 0 < plan["process_gb"] < plan["measured_peak_gb"] <= limit  # the process's resident peak, loading included
    code, out, err = start(capsys, model_dir, data, tmp_path / "whole")
    assert code == 0, err
    assert "memory estimate: peak" in out + err and not (tmp_path / "whole" / "plan.json").exists()
    a, b = (load_file(str(tmp_path / d / "adapters.safetensors")) for d in ("split", "whole"))
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-4, err_msg=k)
    losses = [[json.loads(line)["train_loss"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("split", "whole")]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


def test_a_planned_full_fine_tune_stays_under_its_limit_with_the_same_result(tmp_path, capsys, model_dir, data):
    """--fine-tune-type full: the plan counts the trained blocks' float32 weights, gradients and Adam state."""
    r = recipe(model_dir, data)
    r = msgspec.structs.replace(r, lora=msgspec.structs.replace(r.lora, fine_tune_type="full", dropout=0.0))
    whole, half = estimate_gb(r, 1), estimate_gb(r, 2)
    assert half < whole
    budget.reset_peak(CPU)
    limit = budget.process_gb(CPU) + (whole + half) / 2
    full = ("--fine-tune-type", "full")
    code, out, err = start(capsys, model_dir, data, tmp_path / "split", *full, "--memory-limit", limit)
    assert code == 0, err
    assert "memory plan: 2 micro-steps of ≤4 rows per batch of 8" in out + err and "trained weights (full fine-tune)" in out + err
    plan = json.loads((tmp_path / "split" / "plan.json").read_text())
    assert plan["splits"] == 2 and plan["estimate"]["fine_tune_type"] == "full"
    assert 0 < plan["process_gb"] < plan["measured_peak_gb"] <= limit
    code, _, err = start(capsys, model_dir, data, tmp_path / "whole", *full)
    assert code == 0, err
    a, b = (load_file(str(tmp_path / d / "adapters.safetensors")) for d in ("split", "whole"))
    assert a.keys() == b.keys() and any(k.endswith("mlp.down_proj.weight") for k in a)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-4, err_msg=k)


def test_limits_nothing_fits_are_refused_in_one_line(tmp_path, capsys, model_dir, data):
    code, _, err = start(capsys, model_dir, data, tmp_path / "a", "--memory-limit", 0.01)
    assert code == 2
    assert "below the model's" in error_line(err) and "GB the process needs besides" in error_line(err)
    r = recipe(model_dir, data, seq=512)  # whole rows: a step needs well above the weights
    weights = memory.weight_bytes(check.inspect(r).unwrap().report.facts, 0, 64, "float32") / memory.GB
    one_row = msgspec.structs.replace(r, train=msgspec.structs.replace(r.train, grad_checkpoint=True))
    smallest = estimate_gb(one_row, 8)  # one row per micro-step, checkpointed: the least a step needs
    assert smallest - (weights + budget.FIXED_GB) > 0.02  # room either side of the limit for the process to move
    budget.reset_peak(CPU)
    limit = budget.process_gb(CPU) + (weights + budget.FIXED_GB + smallest) / 2  # the weights fit, a step does not
    code, _, err = start(capsys, model_dir, data, tmp_path / "b", "--memory-limit", limit, seq=512)
    assert code == 2 and "needs at least" in error_line(err) and "the process needs besides" in error_line(err)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_loop_lowers_the_micro_batch_when_the_peak_passes_the_limit(model_dir, data):
    r = recipe(model_dir, data)
    inspection = check.inspect(r).unwrap()
    train = protocol.Data(inspection.tokens["train"], protocol.plan(inspection.tokens["train"], inspection.report.recipe))

    def run(limit: float) -> tuple[list[float], list[str], int]:
        lm = load_base(model_dir, torch.float32, "m").unwrap()
        model = tmodel.attach(lm, r, "m").unwrap()
        opt = ttrain.Optimizer(model.trainable(), r.train, 2)
        losses, lines = [], []
        cursor = loop.run_steps(ttrain.Trainer(model, opt, r.train, CPU), train, None, r.train, 2, rundir.Cursor(),
                                on_report=lambda x: losses.append(x.train_loss), on_save=lambda c: None,
                                on_log=lines.append, memory_limit_gb=limit)
        return losses, lines, cursor.splits

    free, quiet, one = run(0.0)
    squeezed, lines, more = run(1e-4)  # below any real peak: the split doubles after each step
    assert not quiet and one == 1 and more == 4  # checkpoints record the split, so a resume keeps it
    assert [line.split(":")[1].split(" per")[0].strip() for line in lines] == ["2 micro-steps", "4 micro-steps"]
    np.testing.assert_allclose(squeezed, free, rtol=1e-5)
