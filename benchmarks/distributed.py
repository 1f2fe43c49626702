"""Data parallel on one machine: tokens/s of 1 process vs `mlx.launch -n 2` ranks, and all-reduce cost.

Runs `ft train start tiny sql` as subprocesses with the same recipe and global batch:
1 process with 1 BLAS thread, 1 process with 2 BLAS threads (all the cores, the fair baseline),
and 2 ranks with 1 BLAS thread each (ring backend over loopback). Then times one all_sum of
the LoRA gradient's size (what each optimizer step adds) between 2 ranks.
With `--engine torch`: the same rows for the torch engine (`--backend torch`, float32) under
`torchrun --nproc-per-node 2` (gloo over loopback, one thread per rank), and one gloo all_reduce of
the gradient's size, into results-distributed-torch.json.
Usage: python benchmarks/distributed.py [--engine mlx|torch] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = Path(sys.executable).with_name("mlx.launch")
ITERS, REPORT = 40, 10
RECIPE = ["--iters", str(ITERS), "--batch-size", "8", "--max-seq-length", "256", "--lora-rank", "8",
          "--report-every", str(REPORT), "--eval-every", "0", "--save-every", "0", "--learning-rate", "1e-4"]


def port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def env(threads: int) -> dict[str, str]:
    e = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return e


def train(ranks: int, threads: int, out: Path, engine: str = "mlx") -> dict:
    args = ["train", "start", "tiny", "sql", *RECIPE, "--output", str(out), "--backend", engine]
    if engine == "torch":
        args += ["--dtype", "float32"]
    ft = [sys.executable, "-m", "finetune.cli", *args]
    if ranks == 1:
        cmd = ft
    elif engine == "torch":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               "-m", "finetune.cli", *args]
    else:
        cmd = [str(LAUNCH), "-n", str(ranks), "--starting-port", port(), *ft]
    tic = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env(threads), capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - tic
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = rows[1:]  # the first window includes compilation
    params = int(re.search(r"Training ([\d,]+) LoRA", done.stdout).group(1).replace(",", ""))
    return {
        "ranks": ranks, "blas_threads_per_rank": threads,
        "supervised_tokens_per_second": sum(r["tokens_per_second"] for r in steady) / len(steady),
        "iterations_per_second": sum(r["iterations_per_second"] for r in steady) / len(steady),
        "final_train_loss": rows[-1]["train_loss"], "wall_seconds": wall, "lora_parameters": params,
    }


def allreduce(size: int, reps: int = 50) -> float:
    """Seconds per all_sum of `size` float32 between 2 ranks on loopback (median of `reps`)."""
    code = (
        "import json, time, mlx.core as mx\n"
        f"x = mx.ones({size}); g = mx.distributed.init(); ts = []\n"
        f"for i in range({reps} + 5):\n"
        "    t = time.perf_counter(); mx.eval(mx.distributed.all_sum(x)); ts.append(time.perf_counter() - t)\n"
        "ts = sorted(ts[5:])\n"
        "print(json.dumps(ts[len(ts) // 2])) if g.rank() == 0 else None\n"
    )
    cmd = [str(LAUNCH), "-n", "2", "--starting-port", port(), sys.executable, "-c", code]
    done = subprocess.run(cmd, cwd=ROOT, env=env(1), capture_output=True, text=True, timeout=300)
    return float(done.stdout.strip().splitlines()[-1])


def allreduce_torch(size: int, reps: int = 50) -> float:
    """Seconds per gloo all_reduce of `size` float32 between 2 torchrun ranks on loopback (median)."""
    code = (
        "import json, time, torch, torch.distributed as dist\n"
        f"dist.init_process_group('gloo'); x = torch.ones({size}); ts = []\n"
        f"for i in range({reps} + 5):\n"
        "    t = time.perf_counter(); dist.all_reduce(x); ts.append(time.perf_counter() - t)\n"
        "ts = sorted(ts[5:])\n"
        "print(json.dumps(ts[len(ts) // 2])) if dist.get_rank() == 0 else None\n"
        "dist.destroy_process_group()\n"
    )
    script = Path(tempfile.mkdtemp()) / "allreduce.py"
    script.write_text(code)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    done = subprocess.run(cmd, cwd=ROOT, env=env(1), capture_output=True, text=True, timeout=300)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", choices=("mlx", "torch"), default="mlx")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    name = "results-distributed.json" if args.engine == "mlx" else "results-distributed-torch.json"
    args.out = args.out or str(ROOT / "benchmarks" / name)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for ranks, threads in ((1, 1), (1, 2), (2, 1)):
            r = train(ranks, threads, Path(tmp) / f"run-{ranks}x{threads}", args.engine)
            results.append(r)
            print(f"{ranks} rank(s) x {threads} BLAS thread(s): {r['supervised_tokens_per_second']:.0f} supervised tok/s, "
                  f"{r['iterations_per_second']:.2f} it/s, loss {r['final_train_loss']:.4f}", flush=True)
    seconds = (allreduce if args.engine == "mlx" else allreduce_torch)(results[0]["lora_parameters"])
    steps = results[-1]["iterations_per_second"]
    print(f"{args.engine}: all-reduce of {results[0]['lora_parameters']:,} float32 between 2 ranks: {seconds * 1e3:.2f} ms "
          f"({seconds * steps:.1%} of a 2-rank step)")
    load = os.getloadavg()[0]
    Path(args.out).write_text(json.dumps({"engine": args.engine, "runs": results, "allreduce_seconds": seconds, "load_average": load}, indent=2) + "\n")


if __name__ == "__main__":
    main()
