"""Training end to end on real tiny models (HF layout on disk, real tokenizers, real MLX).

Covers: loss falls and the run directory is complete (mlx-lm adapter format, recipe, metrics,
checkpoints); the loss sees supervised tokens only; packed rows equal unpacked ones; gradient
accumulation equals one large batch; SIGKILL + --resume and Ctrl-C + --resume are bit-exact;
refusals are one line and exit 2; mlx-lm loads our adapters with the same logits (Llama and
GPT-2); `ft train quick` runs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from cli_run import one_line_error, run_cli
from mlx.utils import tree_flatten
from model_factory import llama_config

from finetune.cli import main
from finetune.core import batching, lora
from finetune.core import recipe as core_recipe
from finetune.core.config import TrainingConfig
from finetune.core.convert import mlx_to_hf
from finetune.core.tokenize import Tokens
from finetune.engines.mlx import lora as lora_modules
from finetune.engines.mlx import step as trainer
from finetune.engines.mlx.lora import attach_adapter
from finetune.engines.mlx.model import build
from finetune.engines.mlx.step import supervised_ce
from finetune.engines.protocol import Data
from finetune.files.tokenizer import load_tokenizer
from finetune.shell import recipes
from finetune.shell.training import loop
from finetune.shell.training.rundir import Cursor

ROOT = Path(__file__).parents[1]
METRIC_FIELDS = (
    "step", "epoch", "train_loss", "val_loss", "learning_rate", "tokens_per_second",
    "processed_tokens_per_second", "trained_tokens", "peak_memory_gb", "padding_efficiency",
)
LLAMA_KEYS = (
    "mlp.down_proj", "mlp.gate_proj", "mlp.up_proj",
    "self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj",
)



def gpt2_config(vocab: int) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_embd": 64,
        "n_layer": 2,
        "n_head": 4,
        "n_positions": 256,
        "n_ctx": 256,  # mlx-lm's GPT-2 requires it
        "vocab_size": vocab,
        "layer_norm_epsilon": 1e-5,
        "activation_function": "gelu_new",
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


def random_weights(config: dict, seed: int) -> dict[str, mx.array]:
    """Order-one random weights from an explicit key (norm gains near one, biases small)."""
    params = dict(tree_flatten(build(config).parameters()))
    keys = mx.random.split(mx.random.key(seed), len(params))
    out = {}
    for k, name in zip(keys, sorted(params), strict=True):
        shape = params[name].shape
        if "norm" in name or ".ln_" in name:
            out[name] = (1.0 if name.endswith("weight") else 0.0) + 0.1 * mx.random.normal(shape, key=k)
        elif params[name].ndim == 1:
            out[name] = 0.1 * mx.random.normal(shape, key=k)
        else:
            out[name] = 0.15 * mx.random.normal(shape, key=k)
    return out


def write_model(directory: Path, config: dict, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A model directory in HF layout: config.json, model.safetensors, tokenizer files.

    GPT-2 tensors are written without the `transformer.` prefix, as the hub's gpt2 files are.
    """
    directory.mkdir(parents=True)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, directory / f.name)
    hf = mlx_to_hf(config["model_type"], config, random_weights(config, seed))
    if config["model_type"] == "gpt2":
        hf = {k.removeprefix("transformer."): v for k, v in hf.items()}
    mx.save_safetensors(str(directory / "model.safetensors"), hf, metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def reverse_rows(n: int, words: int = 1, offset: int = 0) -> list[dict]:
    """`Q: reverse abc\\nA: ` -> `cba`: a deterministic mapping a tiny model can start to learn."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    rows = []
    for i in range(offset, offset + n):
        text = " ".join(
            "".join(letters[(7 * i + 3 * w + 5 * k) % 26] for k in range(3 + (i + w) % 3))
            for w in range(words)
        )
        rows.append({"prompt": f"Q: reverse {text}\nA: ", "completion": text[::-1]})
    return rows


def write_recipe(path: Path, lora: dict | None = None, **train) -> Path:
    lines = ["[train]"] + [f"{k} = {json.dumps(v)}" for k, v in train.items()]
    if lora:
        lines += ["[lora]"] + [f"{k} = {json.dumps(v)}" for k, v in lora.items()]
    path.write_text("\n".join(lines) + "\n")
    return path






def load_st(path: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


def assert_same_tensors(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module", autouse=True)
def _module_home(module_home):
    """conftest's module_home for every fixture of this module."""


@pytest.fixture(scope="module")
def vocab(tokenizer_dir) -> int:
    return len(load_tokenizer(tokenizer_dir))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tokenizer_dir, vocab) -> Path:
    return write_model(tmp_path_factory.mktemp("models") / "llama", llama_config(vocab), tokenizer_dir)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, tokenizer_dir, vocab) -> Path:
    return write_model(tmp_path_factory.mktemp("models") / "gpt2", gpt2_config(vocab), tokenizer_dir, 1)


@pytest.fixture(scope="module")
def reverse_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data") / "reverse"
    jsonl(d / "train.jsonl", reverse_rows(64))
    jsonl(d / "valid.jsonl", reverse_rows(8, offset=64))
    return d


@pytest.fixture(scope="module")
def long_data(tmp_path_factory) -> Path:
    """Rows of ~100 tokens: a step takes long enough to interrupt a run between checkpoints."""
    d = tmp_path_factory.mktemp("data") / "long"
    jsonl(d / "train.jsonl", reverse_rows(64, words=12))
    return d


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, llama_dir, reverse_data) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4 (copy it before changing it)."""
    out = tmp_path_factory.mktemp("runs") / "small"
    recipe = write_recipe(out.parent / "small.toml", save_every=2, report_every=2, eval_every=0,
                          batch_size=4, learning_rate=1e-2)
    assert main(["train", "start", str(llama_dir), str(reverse_data), "--recipe", str(recipe),
                 "--iters", "4", "--output", str(out)]) == 0
    return out


# ---------------------------------------------------------------------------------------------
# a whole run through `ft train start`


def test_loss_falls_and_the_run_directory_is_complete(tmp_path, capsys, llama_dir, reverse_data):
    recipe = write_recipe(tmp_path / "r.toml", report_every=5, eval_every=10, save_every=10,
                          keep_checkpoints=2, batch_size=8, learning_rate=1e-3, warmup=2)
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "start", llama_dir, reverse_data, "--recipe", recipe,
                             "--iters", "30", "--output", run)
    assert code == 0, err
    assert str(run) in out

    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [5, 10, 15, 20, 25, 30]
    for m in metrics:
        assert set(METRIC_FIELDS) <= m.keys(), m
        assert m["trained_tokens"] > 0 and 0 < m["padding_efficiency"] <= 1
        assert m["tokens_per_second"] > 0 and m["processed_tokens_per_second"] >= m["tokens_per_second"]
        assert m["peak_memory_gb"] > 0
    assert [m["val_loss"] is not None for m in metrics] == [False, True, False, True, False, True]
    assert metrics[-1]["epoch"] == 30 * 8 / 64  # 8 batches of 8 rows per epoch
    assert all(a["trained_tokens"] < b["trained_tokens"] for a, b in zip(metrics, metrics[1:], strict=False))
    first, last = metrics[0]["train_loss"], metrics[-1]["train_loss"]
    assert last < 0.75 * first, (first, last)
    assert metrics[-1]["val_loss"] < metrics[1]["val_loss"]

    # adapter_config.json in mlx-lm's format, keys explicit
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora"
    assert config["num_layers"] == -1
    assert config["lora_parameters"] == {"rank": 8, "scale": 20.0, "dropout": 0.0, "keys": list(LLAMA_KEYS)}
    assert config["model"] == str(llama_dir)

    # adapters.safetensors: model.layers.{i}.<key>.lora_a (in, r) / .lora_b (r, out)
    weights = load_st(run / "adapters.safetensors")
    model = build(json.loads((llama_dir / "config.json").read_text()))
    paths = [f"model.layers.{i}.{k}" for i in range(2) for k in LLAMA_KEYS]
    shapes = lora_modules.linear_shapes(model, paths)
    assert weights.keys() == {f"{p}.{leaf}" for p in paths for leaf in ("lora_a", "lora_b")}
    for p, (fan_in, fan_out) in shapes.items():
        assert weights[f"{p}.lora_a"].shape == (fan_in, 8)
        assert weights[f"{p}.lora_b"].shape == (8, fan_out)
        assert np.any(weights[f"{p}.lora_b"])  # trained

    # recipe.toml decodes to the Recipe the command resolved, the model's context filled in
    expected = recipes.load(recipe, dict(model=str(llama_dir), data=str(reverse_data), iters=30,
                                         output=str(run))).unwrap()
    expected = core_recipe.against_model(expected, llama_config(0)["max_position_embeddings"])
    assert recipes.load(run / "recipe.toml").unwrap() == expected

    # checkpoints: the newest keep_checkpoints=2, each complete; the last equals the final adapters
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step-0000020", "step-0000030"]
    for name, step in (("step-0000020", 20), ("step-0000030", 30)):
        d = run / "checkpoints" / name
        assert sorted(p.name for p in d.iterdir()) == [
            "adapters.safetensors", "optimizer.safetensors", "trainer.json"]
        state = json.loads((d / "trainer.json").read_text())
        assert state["step"] == step and state["batch_index"] == step
        assert load_st(d / "optimizer.safetensors")
    assert_same_tensors(load_st(run / "checkpoints" / "step-0000030" / "adapters.safetensors"), weights)
    # nothing half-written was left behind
    leftovers = [p for p in run.rglob("*") if p.name.startswith(".")]
    assert not leftovers


# ---------------------------------------------------------------------------------------------
# the loss


def tiny_llama(seed: int = 3, vocab: int = 61) -> nn.Module:
    config = llama_config(vocab)
    model = build(config)
    model.load_weights(list(random_weights(config, seed).items()))
    return model


def tiny_gpt2(seed: int = 4, vocab: int = 61) -> nn.Module:
    config = gpt2_config(vocab)
    model = build(config)
    model.load_weights(list(random_weights(config, seed).items()))
    return model


def with_lora(model: nn.Module, seed: int = 5, rank: int = 4, scale: float = 2.0) -> nn.Module:
    """All-linear LoRA with non-zero B (so every factor has a gradient)."""
    block = lora_modules.block_linears(model)
    paths = lora.targets(lora_modules.layers_prefix(model), range(len(model.layers)), block)
    fresh = lora.init(seed, lora_modules.linear_shapes(model, paths), rank)
    params = {k: mx.array(v) for k, v in fresh.items()}
    keys = mx.random.split(mx.random.key(seed + 1), len(params))
    for k, name in zip(keys, sorted(params), strict=True):
        if name.endswith(".lora_b"):
            params[name] = 0.1 * mx.random.normal(params[name].shape, key=k)
    lora_modules.attach(model, params, scale)
    mx.eval(model.parameters())
    return model


def documents(seed: int, n: int, vocab: int = 61, lo: int = 5, hi: int = 40) -> list[Tokens]:
    """Token sequences with a masked prompt and a supervised answer (mask[0] = 0), ids >= 1."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        length = int(rng.integers(lo, hi))
        prompt = int(rng.integers(1, length - 1))
        ids = rng.integers(1, vocab, length).tolist()
        mask = [0] * prompt + [1] * (length - prompt)
        mask[prompt + 1 :: 3] = [0] * len(mask[prompt + 1 :: 3])  # holes inside the answer too
        docs.append(Tokens(tuple(ids), tuple(mask)))
    return docs


def as_arrays(b: batching.Batch) -> list[mx.array]:
    arrays = [b.inputs, b.select, b.targets, b.weights]
    if b.segments is not None:
        arrays += [b.segments, b.positions]
    return [mx.array(a) for a in arrays]


def loss_and_grads(model: nn.Module, fn, *args) -> tuple[float, float, dict[str, np.ndarray]]:
    (loss, count), grads = nn.value_and_grad(model, fn)(model, *args)
    mx.eval(loss, count, grads)
    return loss.item(), count.item(), {k: np.array(v) for k, v in tree_flatten(grads)}


def naive_loss(model: nn.Module, inputs: mx.array, labels: mx.array, mask: mx.array):
    """Full logits at every position, cross-entropy times the mask: the textbook definition."""
    logits = model(inputs).astype(mx.float32)  # (B, T, V)
    ce = nn.losses.cross_entropy(logits, labels, reduction="none")  # (B, T)
    return (ce * mask).sum(), mask.sum()


def labels_and_mask(docs: list[Tokens], width: int) -> tuple[mx.array, mx.array]:
    """Next-token labels and their mask, straight from the documents (one per row)."""
    labels = np.zeros((len(docs), width), np.int32)
    mask = np.zeros((len(docs), width), np.float32)
    for r, d in enumerate(docs):
        n = len(d.ids) - 1
        labels[r, :n] = d.ids[1:]
        mask[r, :n] = d.mask[1:]
    return mx.array(labels), mx.array(mask)


def test_only_supervised_targets_carry_loss_and_gradient():
    model = with_lora(tiny_llama())
    docs = documents(seed=11, n=6)
    b = batching.make_batch([[d] for d in docs], max_length=256)
    supervised = sum(sum(d.mask) for d in docs)
    loss, count, grads = loss_and_grads(model, supervised_ce, *as_arrays(b))
    assert count == supervised == b.supervised  # not + 1 per row (mlx-lm's count)
    assert count < sum(len(d.ids) - 1 for d in docs)  # prompts and holes really are masked

    labels, mask = labels_and_mask(docs, b.inputs.shape[1])
    ref_loss, ref_count, ref_grads = loss_and_grads(model, naive_loss, mx.array(b.inputs), labels, mask)
    assert ref_count == count
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 7 * 2
    for k in grads:
        assert np.abs(ref_grads[k]).max() > 1e-3, k  # every factor really gets a gradient
        np.testing.assert_allclose(grads[k], ref_grads[k], rtol=1e-5, atol=1e-5, err_msg=k)

    # a masked position really contributes nothing: unmasking one target changes the loss
    more = np.array(mask)
    r, t = next((r, t) for r, d in enumerate(docs) for t in range(len(d.ids) - 1) if not d.mask[t + 1])
    more[r, t] = 1.0
    bigger, _, _ = loss_and_grads(model, naive_loss, mx.array(b.inputs), labels, mx.array(more))
    assert bigger > ref_loss

    # whatever sits at the padding positions changes nothing
    noisy = b.inputs.copy()
    rng = np.random.default_rng(0)
    for r, d in enumerate(docs):
        noisy[r, len(d.ids) :] = rng.integers(1, 61, noisy.shape[1] - len(d.ids))
    assert not np.array_equal(noisy, b.inputs)
    arrays = as_arrays(b)
    arrays[0] = mx.array(noisy)
    loss2, count2, grads2 = loss_and_grads(model, supervised_ce, *arrays)
    assert (loss2, count2) == (loss, count)
    for k in grads:
        assert np.array_equal(grads2[k], grads[k]), k


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_packed_rows_give_the_loss_of_separate_rows(make):
    # Llama checks that attention stays inside each document (RoPE scores depend only on
    # relative positions); GPT-2's learned absolute positions also check that positions restart.
    model = with_lora(make())
    docs = documents(seed=12, n=9, lo=4, hi=30)
    plan = batching.packed([len(d.ids) for d in docs], batch_size=16, capacity=64)
    assert len(plan) == 1
    rows = [[docs[i] for i in row] for row in plan[0]]
    assert any(len(row) > 1 for row in rows) and len(rows) < len(docs)  # really packed
    packed = batching.make_batch(rows, max_length=64)
    single = batching.make_batch([[d] for d in docs], max_length=64)
    assert packed.segments is not None and single.segments is None
    assert packed.inputs.size < single.inputs.size

    loss_p, count_p, grads_p = loss_and_grads(model, supervised_ce, *as_arrays(packed))
    loss_s, count_s, grads_s = loss_and_grads(model, supervised_ce, *as_arrays(single))
    assert count_p == count_s == sum(sum(d.mask) for d in docs)
    np.testing.assert_allclose(loss_p, loss_s, rtol=1e-5)
    for k in grads_s:
        np.testing.assert_allclose(grads_p[k], grads_s[k], rtol=1e-4, atol=1e-5, err_msg=k)

    # and the packed loss is not the loss of the plain concatenation (attention is really cut)
    plain = list(as_arrays(packed)[:4])
    loss_c, _, _ = loss_and_grads(model, supervised_ce, *plain)
    assert abs(loss_c - loss_s) > 1e-2 * abs(loss_s)


# ---------------------------------------------------------------------------------------------
# gradient accumulation


def train_once(data: Data, accum: int, optimizer: optim.Optimizer, clip: float, iters: int):
    model = with_lora(tiny_llama(seed=21), seed=22)
    before = {k: np.array(v) for k, v in trainer.flat_trainable(model).items()}
    optimizer.init(model.trainable_parameters())
    cfg = TrainingConfig(iters=iters, batch_size=4, grad_accumulation=accum, max_seq_length=64,
                         schedule="constant", grad_clip=clip, report_every=1, eval_every=0,
                         save_every=0, seed=7)
    reports = []
    cursor = loop.run_steps(trainer.Trainer(model, optimizer, cfg), data, None, cfg, iters, Cursor(),
                           reports.append, lambda c: None, on_log=lambda line: None)
    after = {k: np.array(v) for k, v in trainer.flat_trainable(model).items()}
    return before, after, cursor, reports


@pytest.mark.parametrize(
    ("make_optimizer", "clip", "iters", "atol"),
    [
        (lambda: optim.SGD(learning_rate=0.5), 0.0, 1, 1e-5),
        (lambda: optim.SGD(learning_rate=0.5), 0.05, 1, 1e-5),  # clipping sees the accumulated mean
        # Adam divides by √v: float32 round-off in near-zero gradient components (summed in a
        # different order) is amplified, so allow 1% of one learning-rate step instead.
        (lambda: optim.AdamW(learning_rate=1e-2, weight_decay=0.01), 1.0, 2, 1e-4),
    ],
    ids=["sgd", "sgd-clipped", "adamw-2-steps"],
)
def test_accumulating_two_batches_of_4_equals_one_batch_of_8(make_optimizer, clip, iters, atol):
    docs = documents(seed=31, n=8, lo=4, hi=50)
    # rows of very different supervised counts: a mean of per-batch means would differ
    halves = [sum(d.supervised for d in docs[:4]), sum(d.supervised for d in docs[4:])]
    assert max(halves) > 1.3 * min(halves), halves
    one = Data(docs, [[[i] for i in range(8)]])
    two = Data(docs, [[[i] for i in range(4)], [[i] for i in range(4, 8)]])
    before, big, cursor_big, rep_big = train_once(one, 1, make_optimizer(), clip, iters)
    _, acc, cursor_acc, rep_acc = train_once(two, 2, make_optimizer(), clip, iters)
    assert (cursor_big.step, cursor_big.batch_index) == (iters, iters)
    assert (cursor_acc.step, cursor_acc.batch_index) == (iters, 2 * iters)
    assert cursor_big.trained_tokens == cursor_acc.trained_tokens == iters * sum(halves)
    assert len(rep_big) == len(rep_acc) == iters
    for a, b in zip(rep_big, rep_acc, strict=True):
        np.testing.assert_allclose(a.train_loss, b.train_loss, rtol=1e-5)
    moved = max(np.abs(big[k] - before[k]).max() for k in big)
    assert moved > 1e-3  # the step really changed the adapters
    for k in big:
        np.testing.assert_allclose(acc[k], big[k], rtol=1e-5, atol=atol, err_msg=k)


# ---------------------------------------------------------------------------------------------
# interruption: SIGKILL and Ctrl-C, then --resume


def ft_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["FINETUNE_HOME"] = os.environ["FINETUNE_HOME"]
    env.pop("FT_DEBUG", None)
    return env


def ft_start(args: list, log: Path) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "finetune.cli", *map(str, args)],
                                cwd=ROOT, env=ft_env(), stdout=f, stderr=subprocess.STDOUT)


def ft_run(args: list, log: Path, timeout: float = 120) -> int:
    proc = ft_start(args, log)
    try:
        return proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()


def wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"ft exited ({proc.returncode}) before {path} appeared:\n{log.read_text()}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"{path} did not appear in {timeout}s:\n{log.read_text()}")
        time.sleep(0.005)


@pytest.fixture(scope="module")
def interrupt_setup(tmp_path_factory, llama_dir, long_data):
    """(argv without --output, the finished run of an uninterrupted subprocess)."""
    base = tmp_path_factory.mktemp("interrupt")
    # dropout on: a resumed run must also draw the same dropout masks
    recipe = write_recipe(base / "r.toml", lora={"dropout": 0.1}, save_every=3, report_every=1,
                          eval_every=0, batch_size=8, grad_accumulation=2, max_seq_length=256,
                          learning_rate=1e-3, keep_checkpoints=2)
    argv = ["train", "start", llama_dir, long_data, "--recipe", recipe, "--iters", "12"]
    reference = base / "reference"
    log = base / "reference.log"
    assert ft_run([*argv, "--output", reference], log) == 0, log.read_text()
    return argv, reference


def same_run(run: Path, reference: Path) -> None:
    """Bit-identical adapters, and the same metrics history (timings aside)."""
    assert_same_tensors(load_st(run / "adapters.safetensors"), load_st(reference / "adapters.safetensors"))
    assert json.loads((run / "adapter_config.json").read_text()) == json.loads(
        (reference / "adapter_config.json").read_text())

    def history(d: Path):
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        return [(m["step"], m["epoch"], m["train_loss"], m["learning_rate"], m["trained_tokens"]) for m in rows]

    assert history(run) == history(reference)
    assert [h[0] for h in history(run)] == list(range(1, 13))


def test_sigkill_then_resume_is_bit_identical(tmp_path, interrupt_setup):
    argv, reference = interrupt_setup
    run, log = tmp_path / "run", tmp_path / "ft.log"
    proc = ft_start([*argv, "--output", run], log)
    try:
        wait_for(run / "checkpoints" / "step-0000006", proc, log)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    done = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert "step-0000012" not in done, "the run finished before it was killed"
    assert ft_run([*argv, "--output", run, "--resume"], log) == 0, log.read_text()
    assert "Resuming at step" in log.read_text()
    same_run(run, reference)


def test_ctrl_c_saves_a_checkpoint_exits_130_and_resumes_exactly(tmp_path, interrupt_setup):
    argv, reference = interrupt_setup
    run, log = tmp_path / "run", tmp_path / "ft.log"
    proc = ft_start([*argv, "--output", run], log)
    try:
        wait_for(run / "checkpoints" / "step-0000003", proc, log)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert code == 130, text
    assert "Traceback" not in text
    assert "interrupted at step" in text and "--resume" in text
    steps = [int(p.name.removeprefix("step-")) for p in (run / "checkpoints").iterdir()]
    stopped = max(steps)
    assert 3 <= stopped < 12
    state = json.loads((run / "checkpoints" / f"step-{stopped:07d}" / "trainer.json").read_text())
    assert state["step"] == stopped
    assert ft_run([*argv, "--output", run, "--resume"], log) == 0, log.read_text()
    assert f"Resuming at step {stopped}" in log.read_text()
    same_run(run, reference)


# ---------------------------------------------------------------------------------------------
# refusals: one line, exit 2, nothing changed


def copy_run(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def start_args(llama_dir, data, out, *extra) -> list:
    return ["train", "start", llama_dir, data, "--iters", "4", "--batch-size", "4",
            "--learning-rate", "1e-2", "--output", out, *extra]


def test_resume_without_a_checkpoint_is_refused(tmp_path, capsys, llama_dir, reverse_data):
    out = tmp_path / "empty"
    code, _, err = run_cli(capsys, *start_args(llama_dir, reverse_data, out, "--resume"))
    assert code == 2
    line = one_line_error(err)
    assert "no checkpoint" in line and str(out) in line
    assert not (out / "adapters.safetensors").exists()


def test_starting_over_an_existing_run_is_refused(tmp_path, capsys, llama_dir, reverse_data, small_run):
    run = copy_run(small_run, tmp_path)
    before = snapshot(run)
    code, _, err = run_cli(capsys, *start_args(llama_dir, reverse_data, run))
    assert code == 2
    line = one_line_error(err)
    assert "already holds a run" in line and "--resume" in line
    assert snapshot(run) == before


def test_resuming_with_a_changed_recipe_names_the_field(tmp_path, capsys, llama_dir, reverse_data, small_run):
    run = copy_run(small_run, tmp_path)
    recipe = tmp_path / "changed.toml"
    recipe.write_text((small_run.parent / "small.toml").read_text())
    before = snapshot(run)
    code, _, err = run_cli(capsys, "train", "start", llama_dir, reverse_data, "--recipe", recipe,
                           "--iters", "4", "--output", run, "--lora-rank", "4", "--resume")
    assert code == 2
    line = one_line_error(err)
    assert "lora.rank" in line and "8" in line and "4" in line
    assert snapshot(run) == before


def test_a_corrupt_checkpoint_is_refused_naming_the_file(tmp_path, capsys, llama_dir, reverse_data, small_run):
    run = copy_run(small_run, tmp_path)
    bad = run / "checkpoints" / "step-0000004" / "adapters.safetensors"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    recipe = small_run.parent / "small.toml"
    code, _, err = run_cli(capsys, "train", "start", llama_dir, reverse_data, "--recipe", recipe,
                           "--iters", "4", "--output", run, "--resume")
    assert code == 2
    line = one_line_error(err)
    assert str(bad) in line


def test_attaching_an_adapter_of_the_wrong_shape_names_the_first_bad_tensor(tmp_path, small_run, llama_dir):
    d = tmp_path / "adapter"
    d.mkdir()
    shutil.copy(small_run / "adapter_config.json", d)
    weights = mx.load(str(small_run / "adapters.safetensors"))
    first, later = "model.layers.0.mlp.up_proj.lora_b", "model.layers.1.self_attn.q_proj.lora_a"
    weights[later] = mx.zeros((weights[later].shape[0] + 1, 8))
    weights[first] = mx.zeros((8, weights[first].shape[1] - 1))
    mx.save_safetensors(str(d / "adapters.safetensors"), weights)
    model = build(json.loads((llama_dir / "config.json").read_text()))
    result = attach_adapter(model, d)
    message = result.failure()
    assert first in message and later not in message
    assert str(d / "adapters.safetensors") in message
    assert "(8, 127)" in message and "(8, 128)" in message
    # the good adapter attaches
    model = build(json.loads((llama_dir / "config.json").read_text()))
    assert attach_adapter(model, small_run).unwrap() is model


# ---------------------------------------------------------------------------------------------
# mlx-lm reads our adapters


def token_batches(vocab: int) -> list[mx.array]:
    rng = np.random.default_rng(5)
    return [mx.array(rng.integers(0, vocab, shape).astype(np.int32)) for shape in ((1, 7), (2, 19), (3, 33))]


def compare_with_mlx_lm(model_dir: Path, spec: str, run: Path) -> None:
    import mlx_lm

    import finetune

    ours, _ = finetune.load(spec, adapter=str(run))
    theirs, _ = mlx_lm.load(str(model_dir), adapter_path=str(run))
    base, _ = finetune.load(spec)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    for ids in token_batches(vocab):
        a, b, c = ours(ids), theirs(ids), base(ids)
        mx.eval(a, b, c)
        assert a.shape == b.shape == (*ids.shape, vocab)
        assert mx.abs(a - b).max().item() <= 1e-5
        assert mx.abs(a - c).max().item() > 1e-3  # the adapter really matters


def test_mlx_lm_loads_our_adapters_for_tiny(tmp_path, capsys, reverse_data):
    from finetune.files.tiny import ensure_tiny

    tiny_dir = ensure_tiny()
    run = tmp_path / "run"
    # A modest learning rate: the adapter moves logits by O(1) yet keeps q·k small enough that the
    # two RoPE implementations' float32 angle round-off (ours follows HF's inv_freq; mlx-lm's
    # kernel derives it from the base) stays below 1e-5 on these short sequences.
    code, _, err = run_cli(capsys, "train", "start", "tiny", reverse_data, "--iters", "3",
                           "--batch-size", "2", "--learning-rate", "1e-3", "--max-seq-length", "64",
                           "--output", run)
    assert code == 0, err
    keys = load_st(run / "adapters.safetensors").keys()
    assert all(k.startswith("model.layers.") for k in keys)
    compare_with_mlx_lm(tiny_dir, "tiny", run)


def test_mlx_lm_loads_our_adapters_for_gpt2(tmp_path, capsys, gpt2_dir, reverse_data):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "start", gpt2_dir, reverse_data, "--iters", "3",
                           "--batch-size", "4", "--learning-rate", "1e-3", "--output", run)
    assert code == 0, err
    keys = sorted(load_st(run / "adapters.safetensors"))
    blocks = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    assert keys == sorted(f"model.h.{i}.{b}.{leaf}" for i in range(2) for b in blocks
                          for leaf in ("lora_a", "lora_b"))
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["lora_parameters"]["keys"] == list(blocks)
    compare_with_mlx_lm(gpt2_dir, str(gpt2_dir), run)


# ---------------------------------------------------------------------------------------------
# ft train quick


def test_train_quick_runs_and_shows_before_and_after(tmp_path, capsys):
    out = tmp_path / "quick"
    code, stdout, err = run_cli(capsys, "train", "quick", "--iters", "5", "--output", out)
    assert code == 0, err
    assert "[Before training] model:" in stdout and "[After training] model:" in stdout
    assert "expected:" in stdout
    assert stdout.index("[Before training]") < stdout.index("Iter 5:") < stdout.index("[After training]")
    assert (out / "adapters.safetensors").is_file() and (out / "adapter_config.json").is_file()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 5
