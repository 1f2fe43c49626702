"""Which BLAS MLX-CPU runs on, and what it buys: 1024^2 float32 matmul GFLOP/s and a short `tiny` run.

Each configuration runs in fresh processes (the BLAS is chosen when `finetune` is imported), the
configurations alternate round by round, and medians are reported. Results: results-blas.json.

    python benchmarks/blas.py [--rounds 2] [--iters 40] [--lib NAME=PATH ...]

Configurations: bundled (FT_BLAS=bundled), the system OpenBLAS when present, the PyPI mkl wheel
of this environment with each MKL threading layer, and any --lib (e.g. another wheel's OpenBLAS).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from finetune.engines.mlx import blas

ROOT = Path(__file__).resolve().parent.parent
MATMUL = (
    "import finetune\nfrom finetune.engines.mlx import blas\n"
    "print(max(blas.matmul_gflops(1024, repeats=10) for _ in range(3)))\n"
)


def configurations(extra: list[str], extra_env: list[str], layers: list[str]) -> dict[str, dict[str, str]]:
    """name -> environment additions."""
    out = {"bundled": {"FT_BLAS": "bundled"}}
    system = [str(p) for _, p in blas.find(prefix="/nonexistent")]
    if system:
        out["system OpenBLAS"] = {"FT_BLAS": system[0]}
    mkl = [str(p) for p in blas.wheel_libraries(sys.prefix)]
    for layer in layers if mkl else ():
        out[f"PyPI mkl ({layer})"] = {"FT_BLAS": mkl[0], "MKL_THREADING_LAYER": layer}
    for item in extra:
        name, path = item.split("=", 1)
        out[name] = {"FT_BLAS": path} | dict(kv.split("=", 1) for kv in extra_env)
    return out


def measure(env: dict[str, str], iters: int) -> dict[str, float]:
    """GFLOP/s of the matmul, then wall seconds and supervised tok/s of `ft train start` on tiny."""
    full = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "FT_BLAS")} | env
    gflops = float(subprocess.run([sys.executable, "-c", MATMUL], env=full, capture_output=True,
                                  text=True, check=True).stdout)
    if iters == 0:
        return {"gflops": gflops, "train_s": 0.0, "tok_s": 0.0}
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "finetune.cli", "train", "start", "--recipe", "recipes/quick.toml",
               "--iters", str(iters), "--eval-every", "0", "--save-every", "0", "--output", out, "--backend", "mlx"]
        start = time.perf_counter()
        subprocess.run(cmd, env=full, cwd=ROOT, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - start
        rows = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_second"] for r in rows[1:] if r.get("tokens_per_second")]  # after compile
    return {"gflops": gflops, "train_s": wall, "tok_s": statistics.mean(speeds) if speeds else 0.0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--lib", action="append", default=[], help="NAME=PATH of another library to compare")
    p.add_argument("--lib-env", action="append", default=[], help="VAR=VALUE for every --lib run")
    p.add_argument("--mkl-layers", default="SEQUENTIAL,INTEL,GNU", help="MKL threading layers to run")
    p.add_argument("--matmul-only", action="append", default=["bundled"], help="configurations not trained")
    p.add_argument("--skip", action="append", default=[], help="configuration names to leave out")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results-blas.json"))
    args = p.parse_args()
    load = os.getloadavg()[0]  # others' work skews every number: recorded with the results
    configs = {k: v for k, v in configurations(args.lib, args.lib_env, args.mkl_layers.split(",")).items() if k not in args.skip}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in configs}
    for round_ in range(args.rounds):
        for name, env in configs.items():
            runs[name].append(measure(env, 0 if name in args.matmul_only else args.iters))
            print(f"round {round_ + 1} {name}: {runs[name][-1]}", file=sys.stderr)
    table = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()}
    result = {"iters": args.iters, "rounds": args.rounds, "load_before": load, "load_after": os.getloadavg()[0],
              "configurations": configs, "median": table}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print("| BLAS | 1024² fp32 GFLOP/s | supervised tok/s | `ft train start` wall s |")
    for name, row in table.items():
        trained = f"{row['tok_s']:.0f} | {row['train_s']:.1f}" if row["train_s"] else "– | –"
        print(f"| {name} | {row['gflops']:.0f} | {trained} |")


if __name__ == "__main__":
    main()
