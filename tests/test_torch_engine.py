"""The torch engine trains what the MLX engine trains: same batches, loss, optimizer and files.

Runs are in-process on the bundled `tiny` model (its HF directory is plain transformers).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from finetune.core.config import Recipe
from finetune.shell.training import run as torch_run

# Seven agents share two cores here; OpenMP's spinning threads slow each other down fourfold.
torch.set_num_threads(1)


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def reverse_rows(n: int, offset: int = 0) -> list[dict]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    rows = []
    for i in range(offset, offset + n):
        word = "".join(letters[(7 * i + 5 * k) % 26] for k in range(3 + i % 4))
        rows.append({"prompt": f"Q: reverse {word}\nA: ", "completion": word[::-1]})
    return rows


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data") / "reverse"
    jsonl(d / "train.jsonl", reverse_rows(48))
    jsonl(d / "valid.jsonl", reverse_rows(8, offset=48))
    return d


def recipe(data: Path, out: Path, **train) -> Recipe:
    r = Recipe()
    lora = train.pop("lora", {})
    settings = {**dict(iters=20, batch_size=4, learning_rate=2e-4, report_every=10, eval_every=20,
                       val_batches=-1, save_every=20), **train}
    return msgspec.structs.replace(
        r, output=str(out),
        model=msgspec.structs.replace(r.model, path="tiny", dtype="float32"),
        data=msgspec.structs.replace(r.data, path=str(data)),
        train=msgspec.structs.replace(r.train, **settings),
        lora=msgspec.structs.replace(r.lora, **{"dropout": 0.0, **lora}),
    )


def train_torch(r: Recipe, resume: bool = False) -> torch_run.Prepared:
    prepared = torch_run.prepare_run(r, lambda line: None, engine="torch").unwrap()
    torch_run.fit(prepared, Path(r.output), resume, lambda line: None).unwrap()
    return prepared


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_twenty_float32_steps_match_the_mlx_engine(tmp_path, data):
    from finetune import load
    from finetune.shell.training import run as mlx_run

    mlx_dir, torch_dir = tmp_path / "mlx", tmp_path / "torch"
    r_mlx = recipe(data, mlx_dir)
    prepared = mlx_run.prepare_run(r_mlx, lambda line: None).unwrap()
    mlx_run.fit(prepared, mlx_dir, False, lambda line: None).unwrap()
    model = train_torch(recipe(data, torch_dir)).model

    ours, theirs = load_file(str(torch_dir / "adapters.safetensors")), load_file(str(mlx_dir / "adapters.safetensors"))
    assert ours.keys() == theirs.keys() and len(ours) == 2 * 7 * 4  # every linear of tiny's 4 blocks
    for name in ours:
        assert np.any(theirs[name] != ours[name]) or name.endswith("lora_a")
        rel = np.linalg.norm(ours[name] - theirs[name]) / np.linalg.norm(theirs[name])
        assert rel < 1e-3, (name, rel)
    assert json.loads((torch_dir / "adapter_config.json").read_text()) == json.loads((mlx_dir / "adapter_config.json").read_text())
    val_torch, val_mlx = metrics(torch_dir)[-1]["val_loss"], metrics(mlx_dir)[-1]["val_loss"]
    assert abs(val_torch - val_mlx) / val_mlx < 0.005, (val_torch, val_mlx)
    assert metrics(torch_dir)[-1]["val_loss"] < metrics(torch_dir)[0]["train_loss"]  # it learned

    import mlx.core as mx

    ids = np.array([[0, 294, 30, 900, 203, 305, 30, 1221, 16, 1124, 16, 1200]], np.int64)
    mlx_model, _ = load("tiny", adapter=str(torch_dir))
    logits_mlx = np.array(mlx_model(mx.array(ids.astype(np.int32))))
    model.eval()
    with torch.no_grad():
        logits_torch = model(torch.from_numpy(ids)).numpy()
    assert np.abs(logits_mlx - logits_torch).max() < 1e-4


def test_resume_with_dropout_is_bit_exact(tmp_path, data):
    whole = tmp_path / "whole"
    r = recipe(data, whole, iters=6, save_every=3, report_every=3, eval_every=0, lora={"dropout": 0.2, "keys": ["self_attn.q_proj", "self_attn.v_proj"]})
    train_torch(r)
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    shutil.rmtree(cut / "checkpoints" / "step-0000006")
    (cut / "adapters.safetensors").unlink()
    train_torch(msgspec.structs.replace(r, output=str(cut)), resume=True)
    assert (cut / "adapters.safetensors").read_bytes() == (whole / "adapters.safetensors").read_bytes()
    opt_whole = load_file(str(whole / "checkpoints/step-0000006/optimizer.safetensors"))
    opt_cut = load_file(str(cut / "checkpoints/step-0000006/optimizer.safetensors"))
    assert opt_whole.keys() == opt_cut.keys() and all(np.array_equal(opt_whole[k], opt_cut[k]) for k in opt_whole)
    assert [m["train_loss"] for m in metrics(cut)] == [m["train_loss"] for m in metrics(whole)]



@pytest.mark.parametrize("variant", ["gpt2", "qwen2"])
def test_a_torch_run_on_other_architectures_loads_in_the_mlx_engine_with_its_logits(tmp_path, data, tokenizer_dir, variant):
    """GPT-2's Conv1D layers and Qwen2's biased projections: the adapter means the same in MLX."""
    import mlx.core as mx
    from hf_models import save_hf, tiny_config
    from model_factory import copy_files
    from transformers import AutoModelForCausalLM

    from finetune import load
    from finetune.files.tokenizer import load_tokenizer

    config = tiny_config(variant)
    config.vocab_size = len(load_tokenizer(tokenizer_dir))  # the data's tokenizer
    torch.manual_seed(0)
    directory = save_hf(AutoModelForCausalLM.from_config(config), tmp_path / variant)
    copy_files(tokenizer_dir, directory)
    r = recipe(data, tmp_path / "run", iters=3, learning_rate=1e-2, eval_every=0, save_every=0)
    r = msgspec.structs.replace(r, model=msgspec.structs.replace(r.model, path=str(directory)))
    model = train_torch(r).model
    ids = np.array([[5, 17, 33, 2, 90, 41, 8, 77]], np.int64)
    mlx_model, _ = load(str(directory), adapter=str(tmp_path / "run"))
    model.eval()
    with torch.no_grad():
        ours = model(torch.from_numpy(ids)).numpy()
    theirs = np.array(mlx_model(mx.array(ids.astype(np.int32))))
    assert np.abs(ours - theirs).max() < 1e-4
    with torch.no_grad(), model.peft.disable_adapter():
        plain = model(torch.from_numpy(ids)).numpy()
    assert np.abs(ours - plain).max() > 1e-3  # the adapter changed the logits


def test_packed_rows_train_like_the_mlx_engine(tmp_path, data):
    """Per-document attention: the first packed step's loss is the MLX engine's."""
    from finetune.shell.training import run as mlx_run

    r = recipe(data, tmp_path / "torch", iters=2, report_every=1, eval_every=0, save_every=0, max_seq_length=64)
    r = msgspec.structs.replace(r, data=msgspec.structs.replace(r.data, packing=True))
    train_torch(r)
    m = msgspec.structs.replace(r, output=str(tmp_path / "mlx"))
    mlx_run.fit(mlx_run.prepare_run(m, lambda line: None).unwrap(), tmp_path / "mlx", False, lambda line: None).unwrap()
    ours, theirs = metrics(tmp_path / "torch"), metrics(tmp_path / "mlx")
    assert [row["trained_tokens"] for row in ours] == [row["trained_tokens"] for row in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-4 * b["train_loss"], (a, b)
    assert ours[0]["padding_efficiency"] > 0.7  # rows really were packed


def test_ft_train_start_backend_torch_writes_a_run_and_names_the_engine(tmp_path, capsys, data):
    from cli_run import run_cli

    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "train", "start", "tiny", str(data), "--backend", "torch", "--dtype", "float32",
                                "--iters", "2", "--batch-size", "4", "--output", str(out))
    assert code == 0, err
    line = next(x for x in stdout.splitlines() if x.startswith("backend: torch"))
    assert "float32 compute" in line and "(asked for)" in line
    assert {p.name for p in out.iterdir()} >= {"adapters.safetensors", "adapter_config.json", "recipe.toml", "metrics.jsonl", "checkpoints"}
    code, _, err = run_cli(capsys, "train", "start", "tiny", str(data), "--backend", "torch", "--iters", "2", "--output", str(out))
    assert code == 2 and "already holds a run" in err


def test_bad_backend_choices_get_one_line(tmp_path, capsys, data):
    from cli_run import one_line_error, run_cli

    code, _, err = run_cli(capsys, "train", "start", "tiny", str(data), "--backend", "torch", "--dtype", "float16",
                           "--output", str(tmp_path / "run"))
    assert code == 2 and "float16" in one_line_error(err) and "bfloat16 or float32" in err
    code, _, err = run_cli(capsys, "train", "start", "tiny", str(data), "--backend", "torch", "--quantize-bits", "4",
                           "--output", str(tmp_path / "run"))
    assert code == 2 and "--backend mlx" in one_line_error(err)


from no_mlx import BLOCK_MLX  # noqa: E402  (Python source: `import mlx` fails, as where MLX is missing)


def test_backend_mlx_without_mlx_is_one_line(tmp_path):
    script = (
        BLOCK_MLX +
        "from finetune.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, "train", "start", "tiny", "--backend", "mlx",
                           "--output", str(tmp_path / "run")], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "ft: error: --backend mlx: MLX is not installed here; pip install mlx (Apple silicon), 'mlx[cpu]' or "
        "'mlx[cuda]' (Linux), or use --backend torch"
    ]


def test_the_engines_do_not_import_each_other():
    """The torch engine runs without MLX; the MLX engine's training never loads torch."""
    block_mlx = (
        BLOCK_MLX +
        "import finetune.shell.training.run, finetune.engines.torch.engine, finetune.engines.torch.step\n"
        "import finetune.engines.torch.load, finetune.engines.torch.generate, finetune.engines.torch.evaluate\n"
    )
    subprocess.run([sys.executable, "-c", block_mlx], check=True)
    check_torch = (
        "import sys\n"
        "import finetune.shell.training.run, finetune.engines.mlx.engine, finetune.engines.mlx.step, finetune.cli.train\n"
        "import finetune.engines.mlx.load, finetune.engines.mlx.generate, finetune.engines.mlx.evaluate\n"
        "assert 'torch' not in sys.modules, 'the MLX engine imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", check_torch], check=True)


def test_gradient_checkpointing_trains_the_same_adapters(tmp_path, data):
    runs = []
    for checkpoint in (False, True):
        out = tmp_path / f"gc-{checkpoint}"
        r = recipe(data, out, iters=3, eval_every=0, save_every=0, grad_checkpoint=checkpoint, lora={"keys": ["self_attn.q_proj"]})
        train_torch(r)
        runs.append(load_file(str(out / "adapters.safetensors")))
    assert runs[0].keys() == runs[1].keys()
    for name in runs[0]:
        assert np.allclose(runs[0][name], runs[1][name], rtol=1e-5, atol=1e-7), name


def test_with_neither_engine_ft_says_what_to_install(tmp_path):
    script = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in ('mlx', 'torch', 'peft'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from finetune.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    auto = {k: v for k, v in os.environ.items() if k != "FT_BACKEND"}  # conftest pins mlx
    done = subprocess.run([sys.executable, "-c", script, "train", "start", "tiny", "--output", str(tmp_path / "run")],
                          capture_output=True, text=True, env=auto)
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("ft: error: no training engine installed: pip install 'finetune-lora[torch]'"), line
