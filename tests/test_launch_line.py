"""The README's MLX launch line: `mlx.launch -n 2 -- ft train start ... --backend mlx`.

mlx.launch parses its options anywhere on its command line (argparse's parse_known_args) and has
a `--backend` of its own (ring, mpi, nccl, jaccl), so ft's `--backend mlx` reaches ft only after
`--`, which ends mlx.launch's options (it drops that `--`). Run as a user would: `ft` from PATH,
from a fresh directory, 2 ranks on loopback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from launched import end, free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def launch(argv: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
               OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")  # one BLAS thread a rank
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("FT_DEBUG", None)
    env.pop("FT_BACKEND", None)  # the engine comes from the line alone (auto may pick torch)
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        end(proc)
    return subprocess.CompletedProcess(argv, proc.returncode, out)


def test_readme_line_with_double_dash_trains_two_ranks_on_the_mlx_engine(tmp_path):
    from finetune.files import tiny

    tiny.ensure_tiny()  # built once before the ranks would race for it
    port = ["--starting-port", str(free_port())]  # the only addition: tests run side by side
    line = ["mlx.launch", "-n", "2", *port, "--", "ft", "train", "start", "tiny", "sql", "--backend", "mlx",
            "--iters", "2", "--val-batches", "1", "--output", "runs/sql-2ranks"]
    done = launch(line, tmp_path)
    assert done.returncode == 0, done.stdout
    run = tmp_path / "runs" / "sql-2ranks"
    assert (run / "adapters.safetensors").exists(), done.stdout
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert (last["step"], last["world_size"], last["distributed_backend"]) == (2, 2, "ring")
    assert "(MLX engine: asked for)" in done.stdout  # ft got --backend mlx
    assert done.stdout.count("Adapters in runs/sql-2ranks") == 1  # rank 0 alone prints


def test_without_double_dash_mlx_launch_takes_backend_for_itself(tmp_path):
    line = ["mlx.launch", "-n", "2", "ft", "train", "start", "tiny", "sql", "--backend", "mlx",
            "--iters", "2", "--output", "runs/x"]
    done = launch(line, tmp_path, timeout=60)
    assert done.returncode == 2
    assert "mlx.launch: error: The backend should be one of" in done.stdout
    assert not (tmp_path / "runs").exists()
