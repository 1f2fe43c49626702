"""Data parallel over mx.distributed: `mlx.launch -n 2 ft train start ...` on loopback (ring).

Covers: 2 ranks = 1 process with the same global batch (uneven shares, accumulation); only rank 0
writes and prints; world size and backend recorded; a SIGKILLed rank ends the job in bounded
time naming the rank (the launcher's warning; rank 0's own one line when ranks run without the
launcher), its last checkpoint intact, and --resume finishes with 2 ranks or 1;
ranks that disagree, and more ranks than rows per batch, stop with one line before writing.
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
import numpy as np
import pytest
from launched import end, free_port, rank_pid, wait_for

from finetune.shell.training import checkpoints

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = Path(sys.executable).with_name("mlx.launch")
STEPS = 20
# dropout 0: the two runs draw no random masks; uneven shares (5 rows = 3 + 2), accumulation 2.
# At 1e-3 this random tiny model is chaotic enough that summation order alone grows to ~1e-2
# by step 20 (equal to 4e-6 at step 10); at 2e-4 the runs stay within ~1e-6.
ARGS = ["--batch-size", "5", "--grad-accumulation", "2", "--lora-dropout", "0", "--learning-rate", "2e-4",
        "--max-seq-length", "64", "--lora-rank", "4", "--report-every", "5", "--eval-every", "10",
        "--val-batches", "2", "--save-every", "5", "--warmup", "0"]


def env(home: Path) -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e.update(FINETUNE_HOME=str(home), OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")  # one BLAS thread a rank
    e.pop("FT_DEBUG", None)
    return e




def command(ranks: int, args: list, shell: str | None = None) -> list[str]:
    ft = [sys.executable, "-m", "finetune.cli", *map(str, args)]
    if shell:  # a per-rank command line: `shell` may use $MLX_RANK
        ft = ["bash", "-c", " ".join(ft) + " " + shell]
    if ranks == 1:
        return ft
    return [str(LAUNCH), "-n", str(ranks), "--starting-port", str(free_port()), *ft]


def start(ranks: int, args: list, home: Path, log: Path, shell: str | None = None) -> subprocess.Popen:
    with open(log, "ab") as f:
        # its own session: a failed test ends the launcher and every rank with one killpg
        return subprocess.Popen(command(ranks, args, shell), cwd=ROOT, env=env(home), stdout=f,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)




def run(ranks: int, args: list, home: Path, log: Path, shell: str | None = None) -> str:
    proc = start(ranks, args, home, log, shell)
    try:
        proc.wait(240)
    finally:
        end(proc)
    return log.read_text()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, finetune_home):
    """(data dir, FINETUNE_HOME with `tiny` built, the 1-process reference run)."""
    from finetune.files import tiny

    os.environ["FINETUNE_HOME"] = str(finetune_home)  # build tiny once, before ranks race for it
    tiny.ensure_tiny()
    base = tmp_path_factory.mktemp("dist")
    data = base / "data"
    data.mkdir()
    for split, n, offset in (("train", 40, 0), ("valid", 10, 100)):
        rows = [{"prompt": f"SELECT name FROM users WHERE id = {i}", "completion": f" row {i} " * (1 + i % 4)}
                for i in range(offset, offset + n)]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    reference = base / "reference"
    text = run(1, train_args(data, reference), finetune_home, base / "reference.log")
    assert (reference / "adapters.safetensors").exists(), text
    return data, finetune_home, reference


def train_args(data: Path, out: Path, *extra, steps: int = STEPS) -> list:
    return ["train", "start", "tiny", data, "--iters", steps, *ARGS, "--output", out, *extra]


def close_adapters(run: Path, reference: Path, rtol: float = 1e-4) -> None:
    a, b = mx.load(str(run / "adapters.safetensors")), mx.load(str(reference / "adapters.safetensors"))
    assert set(a) == set(b)
    for k in a:
        x, y = np.array(a[k]), np.array(b[k])
        assert np.linalg.norm(x - y) <= rtol * np.linalg.norm(y), (k, np.linalg.norm(x - y) / np.linalg.norm(y))


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_ranks_train_what_one_process_trains_through_a_killed_rank_and_resume(tmp_path, setup):
    """One 2-rank run, SIGKILLed in rank 1 after a checkpoint, resumed with 2 ranks and with 1."""
    data, home, reference = setup
    run_dir, log = tmp_path / "killed", tmp_path / "ft.log"
    proc = start(2, train_args(data, run_dir), home, log)
    try:
        wait_for(run_dir / "checkpoints" / "step-0000005", proc, log)
        os.kill(rank_pid(proc.pid, 1, "MLX_RANK"), signal.SIGKILL)
        tic = time.monotonic()
        proc.wait(60)
        assert time.monotonic() - tic < 60
    finally:
        end(proc)
    text = log.read_text()
    assert "rank 1" in text and "Traceback" not in text, text
    saved = checkpoints.complete(run_dir)
    assert saved and saved[-1].name != f"step-{STEPS:07d}", "the run finished before the kill"
    for ranks in (2, 1):  # the plan is global: either world size continues where it stopped
        again = tmp_path / f"resumed-{ranks}"
        shutil.copytree(run_dir, again)
        text = run(ranks, train_args(data, again, "--resume"), home, tmp_path / f"resume-{ranks}.log")
        assert "Resuming at step" in text and "Traceback" not in text, text
        close_adapters(again, reference)
        rows, one = metrics(again), metrics(reference)
        # rank 0 alone appends: one row per report, not one per rank
        assert [m["step"] for m in rows] == [m["step"] for m in one] == [5, 10, 15, 20]
        assert [m["trained_tokens"] for m in rows] == [m["trained_tokens"] for m in one]
        for m, r in zip(rows, one, strict=True):
            assert m["train_loss"] == pytest.approx(r["train_loss"], rel=1e-4)
            assert (m["val_loss"] is None) == (r["val_loss"] is None)
            if r["val_loss"] is not None:
                assert m["val_loss"] == pytest.approx(r["val_loss"], rel=1e-4)
        assert {(m["world_size"], m["distributed_backend"]) for m in rows if m["step"] <= 5} == {(2, "ring")}
        assert {(m["world_size"], m["distributed_backend"]) for m in rows[-1:]} == {(ranks, "ring" if ranks == 2 else "none")}
    assert {(m["world_size"], m["distributed_backend"]) for m in metrics(reference)} == {(1, "none")}
    # rank 0 alone prints: every log line once, and the backend line names the ranks
    text = (tmp_path / "resume-2.log").read_text()
    assert text.count("Iter 20: Train loss") == 1 and text.count("backend: ") == 1, text
    assert "2 ranks over ring" in text, text


def by_hand(tmp_path: Path, setup, **extra_env: str) -> tuple[Path, list[subprocess.Popen]]:
    """Two ranks started without the launcher (the environment mlx.launch sets), run to step 5."""
    data, home, _ = setup
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([[f"127.0.0.1:{free_port()}"], [f"127.0.0.1:{free_port()}"]]))
    out, procs = tmp_path / "run", []
    for rank in (0, 1):
        e = env(home) | {"MLX_RANK": str(rank), "MLX_HOSTFILE": str(hosts), **extra_env}
        with open(tmp_path / f"rank{rank}.log", "wb") as f:
            procs.append(subprocess.Popen(command(1, train_args(data, out, steps=10_000)), cwd=ROOT, env=e,
                                          stdout=f, stderr=subprocess.STDOUT, start_new_session=True))
    wait_for(out / "checkpoints" / "step-0000005", procs[0], tmp_path / "rank0.log")
    return out, procs


def one_error_line(log: Path) -> str:
    text = log.read_text()
    lines = [line for line in text.splitlines() if line.startswith("ft: error:")]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def test_without_the_launcher_a_lost_peer_is_one_line_naming_the_rank(tmp_path, setup):
    """Nobody stops rank 0 for us when rank 1 dies."""
    procs = []
    try:
        out, procs = by_hand(tmp_path, setup)
        procs[1].kill()
        assert procs[0].wait(60) == 2
    finally:
        for p in procs:
            end(p)
    line = one_error_line(tmp_path / "rank0.log")
    assert line.startswith("ft: error: rank 0: lost the connection to rank 1") and "--resume" in line
    assert checkpoints.complete(out)


def test_a_hung_peer_ends_both_ranks_with_one_line_and_a_checkpoint_to_resume(tmp_path, setup):
    """A rank stopped (SIGSTOP) keeps its connections open: the all-reduce never fails by itself."""
    procs = []
    try:
        out, procs = by_hand(tmp_path, setup, FT_PEER_TIMEOUT="10")
        procs[1].send_signal(signal.SIGSTOP)
        assert procs[0].wait(120) == -signal.SIGKILL  # the watchdog ends the rank it guards
        assert procs[1].wait(120) == -signal.SIGKILL  # ... stopped or not
    finally:
        for p in procs:
            end(p)
    line = one_error_line(tmp_path / "rank0.log")
    assert line.startswith("ft: error: rank 0: no step finished for ") and "--resume" in line
    assert checkpoints.complete(out)


def test_ctrl_c_on_one_rank_stops_every_rank_after_the_same_step(tmp_path, setup):
    """The Ctrl-C flag rides in the step's all-reduce: rank 0 saves the step where both stopped."""
    data, home, _ = setup
    run_dir, log = tmp_path / "stopped", tmp_path / "ft.log"
    proc = start(2, train_args(data, run_dir, steps=10_000), home, log)
    try:
        wait_for(run_dir / "checkpoints" / "step-0000005", proc, log)
        os.kill(rank_pid(proc.pid, 1, "MLX_RANK"), signal.SIGINT)  # only rank 1 hears it
        proc.wait(120)
    finally:
        end(proc)
    text = log.read_text()
    stopped = [line for line in text.splitlines() if line.startswith("ft: interrupted at step")]
    assert len(set(stopped)) == 1 and "Traceback" not in text, text  # every rank that spoke: the same step
    step = int(stopped[0].split("interrupted at step ")[1].split(":")[0])
    assert checkpoints.complete(run_dir)[-1].name == f"step-{step:07d}", text


def test_a_host_that_never_joins_is_one_line_naming_it(tmp_path, setup):
    data, home, _ = setup
    hosts = tmp_path / "hosts.json"
    silent = f"127.0.0.1:{free_port()}"  # nobody will listen there
    hosts.write_text(json.dumps([[f"127.0.0.1:{free_port()}"], [silent]]))
    e = env(home) | {"MLX_RANK": "0", "MLX_HOSTFILE": str(hosts), "FT_CONNECT_TIMEOUT": "3"}
    done = subprocess.run(command(1, train_args(data, tmp_path / "run", steps=2)), cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"ft: error: rank 0: rank 1 at {silent} did not join within 3 s; check that every host in the hostfile is "
        "reachable at its address from the others and runs this ft (FT_CONNECT_TIMEOUT sets the wait)"
    ]
    assert not (tmp_path / "run").exists()


def test_ranks_that_disagree_stop_before_writing(tmp_path, setup):
    data, home, _ = setup
    out = tmp_path / "differ"
    text = run(2, train_args(data, out, steps=2), home, tmp_path / "ft.log", shell="--seed $((1 + MLX_RANK))")
    errors = [line for line in text.splitlines() if line.startswith("ft: error:")]
    assert errors and all("rank 1 and rank 0 disagree about the recipe, data or model" in e for e in errors), text
    assert "exited with code 2" in text and "Traceback" not in text, text
    assert not (out / "adapters.safetensors").exists() and not (out / "recipe.toml").exists()


def test_more_ranks_than_rows_per_batch_is_refused(tmp_path, setup):
    data, home, _ = setup
    out = tmp_path / "thin"
    args = train_args(data, out, steps=2)
    args[args.index("--batch-size") + 1] = "1"
    text = run(2, args, home, tmp_path / "ft.log")
    errors = [line for line in text.splitlines() if line.startswith("ft: error:")]
    assert errors and all("$.train.batch_size: 1 rows per batch cannot be shared by 2 ranks" in e for e in errors), text
    assert not (out / "recipe.toml").exists()
