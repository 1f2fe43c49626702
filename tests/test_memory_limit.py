"""`--memory-limit`: the plan made before loading, recorded in plan.json, the same optimisation
split into micro-steps, refusals in one line, and the loop lowering the micro-batch at run time."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.optimizers as optim
import msgspec
import numpy as np
import pytest
from cli_run import error_line, run_cli
from memory_runs import model_with_lora, rows
from model_factory import llama_config
from test_training import jsonl, reverse_rows, write_model

from finetune.core import batching, memplan
from finetune.core.config import Recipe
from finetune.engines.mlx import step as trainer
from finetune.engines.protocol import Data
from finetune.files.tokenizer import load_tokenizer
from finetune.shell.data import check
from finetune.shell.training import loop
from finetune.shell.training.rundir import Cursor


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tokenizer_dir):
    config = llama_config(len(load_tokenizer(tokenizer_dir)))
    return write_model(tmp_path_factory.mktemp("models") / "llama", config, tokenizer_dir)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data") / "reverse"
    jsonl(d / "train.jsonl", reverse_rows(32, words=4))
    return d


def recipe(llama_dir, data, out) -> Recipe:
    return msgspec.convert({"model": {"path": str(llama_dir)}, "data": {"path": str(data)}, "output": str(out),
                            "train": {"batch_size": 8, "iters": 3, "learning_rate": 1e-2, "eval_every": 0,
                                      "save_every": 0, "max_seq_length": 256}}, Recipe)


def planned(r: Recipe, limit: float):
    inspection = check.inspect(r).unwrap()
    from finetune.engines.mlx import budget

    return budget.plan(inspection.report.recipe, inspection.report.facts, inspection.tokens["train"], limit)


def start(capsys, llama_dir, data, out, *extra):
    return run_cli(capsys, "train", "start", llama_dir, data, "--batch-size", 8, "--iters", 3, "--learning-rate", 0.01,
                   "--eval-every", 0, "--max-seq-length", 256, "--output", out, *extra)


def test_a_limit_splits_each_batch_into_micro_steps_with_the_same_result(tmp_path, capsys, llama_dir, data):
    r = recipe(llama_dir, data, tmp_path / "x")
    whole = planned(r, 100.0).unwrap()
    assert whole.splits == 1 and whole.micro_batch == 8
    limit = (planned(r, 1e-6 + whole.estimate.total_gb).unwrap().estimate.total_gb + _est(r, 4)) / 2
    code, out, err = start(capsys, llama_dir, data, tmp_path / "split", "--memory-limit", limit)
    assert code == 0, err
    assert "memory plan: 2 micro-steps of ≤4 rows per batch of 8" in out + err
    plan = json.loads((tmp_path / "split" / "plan.json").read_text())
    assert plan["splits"] == 2 and plan["micro_batch"] == 4 and plan["effective_batch"] == 8
    assert plan["estimate"]["total_gb"] <= limit and plan["measured_peak_gb"] > 0
    code, _, err = start(capsys, llama_dir, data, tmp_path / "whole")
    assert code == 0, err
    assert json.loads((tmp_path / "whole" / "plan.json").read_text())["splits"] == 1
    a, b = (mx.load(str(tmp_path / d / "adapters.safetensors")) for d in ("split", "whole"))
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), atol=1e-3, err_msg=k)  # Adam turns rounding in near-zero gradients into up to ~lr
    losses = [[json.loads(line)["train_loss"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("split", "whole")]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


def _est(r: Recipe, micro: int) -> float:
    """The estimate at a micro-batch of `micro` rows (through the planner's own shapes)."""
    inspection = check.inspect(r).unwrap()
    from finetune.shell.training.run import plan as batch_plan

    rr = inspection.report.recipe
    work = memplan.workload(batch_plan(inspection.tokens["train"], rr), inspection.tokens["train"], rr.train.max_seq_length)
    rows_, width, chosen = memplan.micro_shape(work, 8 // micro)
    from finetune.core import memory

    return memory.estimate(inspection.report.facts, rr, width, "float32", chosen, rows_).total_gb


def test_limits_nothing_fits_are_refused_in_one_line(tmp_path, capsys, llama_dir, data):
    code, _, err = start(capsys, llama_dir, data, tmp_path / "a", "--memory-limit", 1e-5)
    assert code == 2
    assert "below the model's" in error_line(err) and "GB of weights" in error_line(err)
    r = recipe(llama_dir, data, tmp_path / "x")
    weights = planned(r, 100.0).unwrap().estimate.weights_gb
    code, _, err = start(capsys, llama_dir, data, tmp_path / "b", "--memory-limit", weights * 1.01)
    assert code == 2
    line = error_line(err)
    needed = float(line.split("needs at least ")[1].split(" GB")[0])
    assert needed > weights and "checkpointing" in line
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_checkpointing_turns_on_only_when_one_row_does_not_fit_without_it(tmp_path, llama_dir, data):
    r = recipe(llama_dir, data, tmp_path / "x")
    one = _est(r, 1)
    p = planned(r, one * 0.999).unwrap()  # one row does not fit without checkpointing: it turns on
    assert p.grad_checkpoint and p.estimate.total_gb <= one * 0.999
    assert not planned(r, one * 1.001).unwrap().grad_checkpoint


def test_the_loop_lowers_the_micro_batch_when_the_peak_passes_the_limit():
    config = llama_config(400)
    r = msgspec.convert({"train": {"batch_size": 8, "iters": 3, "learning_rate": 1e-2, "report_every": 1, "max_seq_length": 256}}, Recipe)
    examples = rows(24, 63, 0.5, 400)
    data = Data(examples, batching.length_sorted([len(e.ids) for e in examples], 8))

    def run(limit: float) -> tuple[list[float], list[str]]:
        mx.random.seed(0)
        model = model_with_lora(config, r)
        opt = optim.AdamW(learning_rate=1e-2)
        losses, lines = [], []
        cursor = loop.run_steps(trainer.Trainer(model, opt, r.train), data, None, r.train, 3, Cursor(), on_report=lambda x: losses.append(x.train_loss),
                               on_save=lambda c: None, on_log=lines.append, memory_limit_gb=limit)
        assert cursor.splits == (8 if limit else 1)  # checkpoints record the split, so a resume keeps it
        return losses, lines

    free, quiet = run(0.0)
    squeezed, lines = run(1e-4)  # below any real peak: the split doubles after each step
    assert not quiet
    assert [line.split(":")[1].split(" per")[0].strip() for line in lines] == ["2 micro-steps", "4 micro-steps", "8 micro-steps"]
    np.testing.assert_allclose(squeezed, free, rtol=1e-5)


def test_validate_json_reports_the_estimate_start_plans_with(tmp_path, capsys, llama_dir, data):
    code, out, err = run_cli(capsys, "train", "validate", data, "--model", llama_dir, "--batch-size", 8,
                             "--max-seq-length", 256, "--json")
    assert code == 0, err
    est = json.loads(out)["estimate"]
    assert est["total_gb"] == pytest.approx(est["weights_gb"] + est["lora_gb"] + est["activations_gb"])
    assert est["batch_size"] == 8 and est["seq_len"] % 32 == 0 and not est["grad_checkpoint"]
    planned_est = planned(recipe(llama_dir, data, tmp_path / "x"), 100.0).unwrap().estimate
    assert est == msgspec.to_builtins(planned_est)  # validate and start see the same largest batch
