"""Data parallel in the torch engine: `torchrun --nproc-per-node 2 -m finetune.cli train start --backend torch`
on loopback (gloo, one thread per rank).

Covers: 2 ranks = 1 process with the same global batch (uneven 3 + 2 shares, accumulation); only
rank 0 writes and prints; world size and backend recorded; Ctrl-C at torchrun stops every rank at
one step with rank 0's checkpoint saved; --resume from it with 2 ranks and with 1; a SIGKILLed
rank ends the job in bounded time with the rank named and the last checkpoint intact (and
resumable); ranks that disagree (started by hand, no agent) stop before writing; each launcher
refuses the other engine.
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

import numpy as np
import pytest
import torch
from launched import end, free_port, rank_pid, wait_for
from safetensors.numpy import load_file

from finetune.cli import main
from finetune.engines.protocol import World
from finetune.shell.training import checkpoints, rundir

torch.set_num_threads(1)  # the reference run, like each rank below

ROOT = Path(__file__).resolve().parents[1]
STEPS = 20
# dropout 0, float32; uneven shares (5 rows = 3 + 2) and accumulation 2, as tests/test_distributed.py.
ARGS = ["--batch-size", "5", "--grad-accumulation", "2", "--lora-dropout", "0", "--learning-rate", "2e-4",
        "--max-seq-length", "64", "--lora-rank", "4", "--report-every", "5", "--eval-every", "10",
        "--val-batches", "2", "--save-every", "5", "--warmup", "0", "--backend", "torch", "--dtype", "float32"]


def env(home: Path) -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e.update(FINETUNE_HOME=str(home), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for key in ("FT_DEBUG", "WORLD_SIZE", "RANK", "LOCAL_RANK", "MLX_RANK", "MLX_HOSTFILE"):
        e.pop(key, None)
    return e


def torchrun(ranks: int, args: list) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
            "-m", "finetune.cli", *map(str, args)]


def start(cmd: list[str], home: Path, log: Path, **extra: str) -> subprocess.Popen:
    with open(log, "ab") as f:  # its own session: a failed test ends torchrun and every rank with one killpg
        return subprocess.Popen(cmd, cwd=ROOT, env=env(home) | extra, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)




def run(cmd: list[str], home: Path, log: Path) -> tuple[int, str]:
    proc = start(cmd, home, log)
    try:
        code = proc.wait(240)
    finally:
        end(proc)
    return code, log.read_text()




def train_args(data: Path, out: Path, *extra, steps: int = STEPS) -> list:
    return ["train", "start", "tiny", data, "--iters", steps, *ARGS, "--output", out, *extra]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, finetune_home):
    """(data dir, FINETUNE_HOME with `tiny` built, the 1-process reference run)."""
    from finetune.files import tiny

    os.environ["FINETUNE_HOME"] = str(finetune_home)  # build tiny once, before ranks race for it
    tiny.ensure_tiny()
    base = tmp_path_factory.mktemp("tdist")
    data = base / "data"
    data.mkdir()
    # 41 rows: the last batch has 1 row, so rank 1's share of it is empty (weights 0, it still joins)
    for split, n, offset in (("train", 41, 0), ("valid", 10, 100)):
        rows = [{"prompt": f"SELECT name FROM users WHERE id = {i}", "completion": f" row {i} " * (1 + i % 4)}
                for i in range(offset, offset + n)]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    reference = base / "reference"
    assert main([str(a) for a in train_args(data, reference)]) == 0  # in-process: one import of torch fewer
    return data, finetune_home, reference


def close_adapters(run_dir: Path, reference: Path, rtol: float = 1e-4) -> None:
    a, b = load_file(str(run_dir / "adapters.safetensors")), load_file(str(reference / "adapters.safetensors"))
    assert set(a) == set(b)
    for k in a:
        assert np.linalg.norm(a[k] - b[k]) <= rtol * np.linalg.norm(b[k]), (k, np.linalg.norm(a[k] - b[k]) / np.linalg.norm(b[k]))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def same_curve(run_dir: Path, reference: Path, resumed_at: int) -> None:
    """The reports match, but the train loss of a window cut by the resume (it restarts there)."""
    rows, one = metrics(run_dir), metrics(reference)
    # rank 0 alone appends: one row per report, not one per rank
    assert [m["step"] for m in rows] == [m["step"] for m in one] == [5, 10, 15, 20]
    assert [m["trained_tokens"] for m in rows] == [m["trained_tokens"] for m in one]
    for m, r in zip(rows, one, strict=True):
        if not m["step"] - 5 < resumed_at < m["step"]:
            assert m["train_loss"] == pytest.approx(r["train_loss"], rel=1e-4)
        assert (m["val_loss"] is None) == (r["val_loss"] is None)
        if r["val_loss"] is not None:  # summed over the ranks' shares
            assert m["val_loss"] == pytest.approx(r["val_loss"], rel=1e-4)


def test_two_ranks_train_what_one_process_trains_through_ctrl_c_and_resume(tmp_path, setup):
    """A 2-rank run stopped with Ctrl-C at torchrun, resumed with 2 ranks and with 1: both end
    where the 1-process run does (the plan is global, so any stopping step will do)."""
    data, home, reference = setup
    stopped, log = tmp_path / "stopped", tmp_path / "ft.log"
    proc = start(torchrun(2, train_args(data, stopped)), home, log)
    try:
        wait_for(stopped / "checkpoints" / "step-0000005", proc, log)
        os.kill(proc.pid, signal.SIGINT)  # torchrun passes it on to every rank
        proc.wait(60)
    finally:
        end(proc)
    text = log.read_text()
    saved = checkpoints.complete(stopped)
    at = int(saved[-1].name.removeprefix("step-"))
    assert 5 <= at < STEPS, f"the run finished before Ctrl-C:\n{text}"
    # every rank stopped at the same step, and rank 0 saved it
    assert text.count(f"ft: interrupted at step {at}: checkpoint saved in {stopped}") == 2, text
    assert not [p for p in stopped.rglob("*") if p.name.startswith(".")], "temporary files left behind"
    assert {(m["world_size"], m["distributed_backend"]) for m in metrics(stopped)} == {(2, "gloo")}
    for ranks in (2, 1):
        again = tmp_path / f"resumed-{ranks}"
        shutil.copytree(stopped, again)
        if ranks == 2:
            code, text = run(torchrun(2, train_args(data, again, "--resume")), home, tmp_path / "resume.log")
            assert code == 0 and f"Resuming at step {at} of {STEPS}" in text, text
            # rank 0 alone prints: every log line once, and the backend line names the ranks
            assert text.count("Iter 20: Train loss") == 1 and text.count("backend: torch") == 1, text
            assert [line for line in text.splitlines() if line.startswith("backend:")][0].endswith(", 2 ranks over gloo")
        else:  # in-process: one import of torch fewer
            assert main([str(a) for a in train_args(data, again, "--resume")]) == 0
        close_adapters(again, reference)
        same_curve(again, reference, at)
        expected = (2, "gloo") if ranks == 2 else (1, "none")
        assert [(m["world_size"], m["distributed_backend"]) for m in metrics(again)][-1] == expected
        assert sorted(p.name for p in again.iterdir()) == sorted(p.name for p in reference.iterdir())
    assert {(m["world_size"], m["distributed_backend"]) for m in metrics(reference)} == {(1, "none")}


def test_a_killed_rank_ends_the_job_naming_it_and_the_checkpoint_resumes(tmp_path, setup):
    data, home, _ = setup
    out, log = tmp_path / "killed", tmp_path / "ft.log"
    proc = start(torchrun(2, train_args(data, out, steps=100_000)), home, log)
    try:
        wait_for(out / "checkpoints" / "step-0000005", proc, log)
        os.kill(rank_pid(proc.pid, 1, "RANK"), signal.SIGKILL)
        tic = time.monotonic()
        code = proc.wait(60)
        assert time.monotonic() - tic < 60
    finally:
        end(proc)
    text = log.read_text()
    assert code != 0
    # torchrun's summary names the rank that died; rank 0 says in one line why it stopped
    assert "rank      : 1 (local_rank: 1)" in text and "SIGKILL" in text, text
    ours = [line for line in text.splitlines() if line.startswith("ft: error:")]
    assert len(ours) <= 1 and all(line.startswith(("ft: error: rank 0: lost rank 1", "ft: error: rank 0: stopped by torchrun"))
                                  for line in ours), text
    assert "finetune/" not in "".join(line for line in text.splitlines() if line.lstrip().startswith("File ")), text
    saved = checkpoints.complete(out)
    assert saved
    step = int(saved[-1].name.removeprefix("step-"))
    # the last checkpoint loads and --resume finishes the run (here 2 steps on, in one process)
    assert main([str(a) for a in train_args(data, out, "--resume", steps=step + 2)]) == 0
    assert metrics(out)[-1]["step"] == step + 2


def test_ranks_that_disagree_stop_before_writing(tmp_path, setup):
    """Ranks started by hand in the environment torchrun sets (no agent: one import of torch fewer)."""
    data, home, _ = setup
    out, procs, port = tmp_path / "differ", [], str(free_port())
    try:
        for rank in (0, 1):
            ft = [sys.executable, "-m", "finetune.cli", *map(str, train_args(data, out, "--seed", 1 + rank, steps=2))]
            procs.append(start(ft, home, tmp_path / f"rank{rank}.log", RANK=str(rank), LOCAL_RANK=str(rank),
                               WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
        codes = [p.wait(240) for p in procs]
    finally:
        for p in procs:
            end(p)
    for rank in (0, 1):
        text = (tmp_path / f"rank{rank}.log").read_text()
        errors = [line for line in text.splitlines() if line.startswith("ft: error:")]
        assert codes[rank] == 2 and "Traceback" not in text, text
        assert errors == ["ft: error: rank 1 and rank 0 disagree about the recipe, data or model; start every rank "
                          "with the same recipe, data and model (same files on every host)"], text
    assert not (out / "adapters.safetensors").exists() and not (out / "recipe.toml").exists()


def test_more_ranks_than_rows_per_batch_is_refused():
    message = rundir.check_world(World(1, 3, "gloo"), 2).failure()
    assert message.startswith("$.train.batch_size: 2 rows per batch cannot be shared by 3 ranks")
    assert rundir.check_world(World(0, 2, "gloo"), 2).unwrap() is None


def test_torch_under_mlx_launch_is_refused(tmp_path, monkeypatch, capsys, setup):
    data = setup[0]
    monkeypatch.setenv("MLX_RANK", "0")
    assert main([str(a) for a in train_args(data, tmp_path / "run", steps=2)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("ft: error: the torch engine (asked for) under mlx.launch: mlx.launch starts the MLX engine's ranks"), line
    assert "torchrun" in line and not (tmp_path / "run").exists()


def test_mlx_under_torchrun_is_refused(tmp_path, monkeypatch, capsys, setup):
    data = setup[0]
    monkeypatch.setenv("WORLD_SIZE", "2"), monkeypatch.setenv("RANK", "0"), monkeypatch.setenv("LOCAL_RANK", "0")
    args = [str(a) for a in train_args(data, tmp_path / "run", steps=2)]
    args[args.index("--backend") + 1] = "mlx"
    assert main(args) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("ft: error: the MLX engine (asked for) under torchrun (WORLD_SIZE=2)"), line
    assert "--backend torch" in line and "mlx.launch" in line and not (tmp_path / "run").exists()
