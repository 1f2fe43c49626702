"""README claims that its blocks alone do not prove (issue 22): a QLoRA adapter is refused on any
base but its own, one memory unit (GB = 10^9 bytes) in every line and file, the LoRA share the same
in training and validate, help texts that say what the code does, and a packing-aware estimate."""

from __future__ import annotations

import gc
import json
import math
import re
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import msgspec
import numpy as np
import pytest
from cli_run import error_line, run_cli
from memory_runs import model_with_lora, rows
from model_factory import llama_config
from safetensors.numpy import load_file, save_file
from test_quantized import llama_and_rows, mlx_convert

import finetune
from finetune.core import memory, modelinfo
from finetune.core.config import Recipe
from finetune.engines.mlx import step as trainer
from finetune.engines.protocol import Data
from finetune.errors import UserError
from finetune.shell.training import loop
from finetune.shell.training.rundir import Cursor

TRAIN = ("--iters", "2", "--batch-size", "2", "--learning-rate", "1e-2", "--lora-rank", "4", "--val-batches", "1")
Q4 = ("--quantize-bits", "4", "--quantize-group-size", "32")


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    """A float llama, another of the same shape (other weights), and both converted to 4 bits by mlx-lm."""
    root = tmp_path_factory.mktemp("claims")
    source, data = llama_and_rows(root)
    other = root / "other"
    shutil.copytree(source, other)
    rng = np.random.default_rng(1)
    tensors = load_file(str(other / "model.safetensors"))
    save_file({k: (v + rng.normal(0, 0.02, v.shape)).astype(v.dtype) if v.ndim == 2 else v for k, v in tensors.items()},
              str(other / "model.safetensors"), metadata={"format": "pt"})
    return {"float": source, "other": other, "data": data,
            "q4": mlx_convert(source, root / "q4", q_bits=4, q_group_size=32),
            "other-q4": mlx_convert(other, root / "other-q4", q_bits=4, q_group_size=32)}


@pytest.fixture(scope="module")
def on_load_run(tmp_path_factory, bases) -> tuple[Path, str]:
    """QLoRA with the float base quantized on load: (run dir, the run's stdout)."""
    import contextlib
    import io

    from finetune.cli import main

    out = tmp_path_factory.mktemp("runs") / "q4-on-load"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main([str(a) for a in ("train", "start", bases["float"], bases["data"], *TRAIN, *Q4, "--output", out)]) == 0
    return out, printed.getvalue()


def test_a_qlora_adapter_is_refused_on_other_weights_quantized_on_load_the_same_way(tmp_path, capsys, bases, on_load_run):
    run, _ = on_load_run
    record = json.loads((run / "adapter_config.json").read_text())["base_quantization"]
    assert record["quantized_on_load"] is True and len(record["base_digest"]) == 64
    finetune.load(str(bases["float"]), adapter=str(run))  # its own base, quantized again: accepted
    with pytest.raises(UserError, match="trained on another 4-bit affine, group size 32 base"):
        finetune.load(str(bases["other"]), adapter=str(run))
    code, _, err = run_cli(capsys, "generate", bases["other"], "--adapter", run, "--prompt", "Q: reverse abc", "--max-tokens", "2")
    assert code == 2 and "load the base it was trained on" in error_line(err)
    code, _, err = run_cli(capsys, "fuse", bases["other"], "--adapter", run, "--output", tmp_path / "a", "--dequantize")
    assert code == 2 and "trained on another" in error_line(err) and not (tmp_path / "a").exists()
    # ft fuse computes the digest with NumPy: the same as the MLX loader's on the right base
    code, _, err = run_cli(capsys, "fuse", bases["float"], "--adapter", run, "--output", tmp_path / "b", "--dequantize")
    assert code == 0, err


def test_a_qlora_adapter_of_a_quantized_checkpoint_is_refused_on_another_quantized_the_same_way(tmp_path, capsys, bases):
    code, _, err = run_cli(capsys, "train", "start", bases["q4"], bases["data"], *TRAIN, "--output", tmp_path / "run")
    assert code == 0, err
    finetune.load(str(bases["q4"]), adapter=str(tmp_path / "run"))
    with pytest.raises(UserError, match="trained on another 4-bit affine"):
        finetune.load(str(bases["other-q4"]), adapter=str(tmp_path / "run"))
    code, _, err = run_cli(capsys, "fuse", bases["other-q4"], "--adapter", tmp_path / "run", "--output", tmp_path / "a", "--dequantize")
    assert code == 2 and "trained on another" in error_line(err)
    code, _, err = run_cli(capsys, "fuse", bases["q4"], "--adapter", tmp_path / "run", "--output", tmp_path / "b", "--dequantize")
    assert code == 0, err


def test_training_and_validate_state_the_same_lora_share_of_the_base(capsys, on_load_run):
    run, printed = on_load_run  # a 4-bit base: its packed words are not counted as parameters
    trained = re.search(r"Training ([\d,]+) LoRA parameters \(([\d.]+)% of the base\)", printed)
    code, out, err = run_cli(capsys, "train", "validate", run / "recipe.toml")  # the same recipe
    checked = re.search(r"LoRA trains ([\d,]+) parameters \(([\d.]+)% of the base\)", out)
    assert trained and checked, (printed, out)
    assert trained.groups() == checked.groups()


def test_one_unit_gb_of_10_9_bytes_in_the_log_metrics_and_plan(on_load_run):
    run, printed = on_load_run
    assert memory.GB == 10**9
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [float(x) for x in re.findall(r"Peak mem ([\d.]+) GB", printed)]
    assert logged == [round(m["peak_memory_gb"], 3) for m in metrics]
    plan = json.loads((run / "plan.json").read_text())
    last = metrics[-1]["peak_memory_gb"]  # the same process peak, read after the last step and at the end
    assert last <= plan["measured_peak_gb"] < 1.05 * last, (last, plan["measured_peak_gb"])


def _help(capsys, *command: str) -> str:
    code, out, _ = run_cli(capsys, *command, "--help")
    assert code == 0
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", out).split())


def test_help_states_defaults_and_what_the_code_does(capsys):
    start = _help(capsys, "train", "start")
    assert "--output STR Run directory. [default: runs/run]" in start
    assert "--iters INT Optimizer steps (instead of --epochs). [default: 1000]" in start
    assert "the planner may train a batch as several micro-steps" in start  # --batch-size
    assert "on the torch engine bfloat16 where bf16 is native" in start  # --dtype auto
    assert "GB (10^9 bytes) the run may use" in start
    quick = _help(capsys, "train", "quick")
    assert "[default: runs/quick, or runs/quick-N when that exists]" in quick
    assert "(instead of --epochs). [default: 200]" in quick


def _packed_peak(config: dict, r: Recipe, seq: int, docs: int) -> int:
    """Peak bytes of one train step on batches of rows that each pack `docs` documents into `seq` tokens."""
    gc.collect()
    mx.clear_cache()
    model = model_with_lora(config, r)
    mx.reset_peak_memory()
    t = r.train
    examples = rows(t.batch_size * docs, seq // docs, 0.5, config["vocab_size"])
    plan = [[[i * docs + d for d in range(docs)] for i in range(t.batch_size)]]
    optimizer = optim.AdamW(learning_rate=t.learning_rate)
    optimizer.init(model.trainable_parameters())
    with trainer.checkpointed(model, t.grad_checkpoint):
        loop.run_steps(trainer.Trainer(model, optimizer, t), Data(examples, plan), None, msgspec.structs.replace(t, report_every=1), 1,
                          Cursor(), on_report=lambda _: None, on_save=lambda _: None, on_log=lambda _: None)
    peak = mx.get_peak_memory()
    del model, optimizer
    gc.collect()
    mx.clear_cache()
    return peak


@pytest.mark.parametrize(("batch", "seq"), [(4, 512), (8, 256)])
def test_the_estimate_counts_what_packing_adds(batch, seq):
    config = llama_config(400)
    r = msgspec.convert({"data": {"packing": True}, "lora": {"rank": 8}, "train": {
        "batch_size": batch, "iters": 1, "max_seq_length": 1024, "eval_every": 0}}, Recipe)
    peak = _packed_peak(config, r, seq, docs=2)
    chosen = 64 * math.ceil(batch * int(seq / 2 * 0.5) * 2 / 64)
    facts = modelinfo.facts(config).unwrap()
    est = memory.estimate(facts, r, seq, supervised=chosen)
    unpacked = memory.estimate(facts, msgspec.structs.replace(r, data=msgspec.structs.replace(r.data, packing=False)), seq, supervised=chosen)
    assert est.total_gb > unpacked.total_gb
    assert abs(est.total_gb * memory.GB / peak - 1) <= 0.15, (est.total_gb, peak / memory.GB)


def test_the_distribution_is_named_finetune_lora_and_install_hints_say_so():
    """`finetune` on PyPI is another project: pyproject, the installed metadata and every hint use `finetune-lora`."""
    import importlib.metadata
    import tomllib

    from finetune.engines import choose

    root = Path(__file__).resolve().parents[1]
    assert tomllib.loads((root / "pyproject.toml").read_text())["project"]["name"] == "finetune-lora"
    assert importlib.metadata.version("finetune-lora")
    assert "'finetune-lora[torch]'" in choose.INSTALL_TORCH
    readme = (root / "README.md").read_text()
    assert "`finetune-lora`" in readme and "pip install 'finetune[" not in readme
