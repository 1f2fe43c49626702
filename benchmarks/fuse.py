"""`ft fuse` on a SmolLM-135M-shaped Llama, float32 and mlx-lm 4-bit: time and peak memory by check engine.

Rows: the check run by MLX, by torch (MLX hidden), by NumPy alone (MLX and torch hidden) — reading,
fusing and writing are NumPy in all three — and, with `--before COMMIT`, that commit's fuse (MLX
throughout), from `git archive`. Fresh processes, alternating, medians; peak = the process's
max RSS. An adapter of rank 8 on every linear with random B; output in the base's dtype (the
4-bit base: re-quantized, group size 64).

    python benchmarks/fuse.py [--rounds 3] [--before 679c990]
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
from no_mlx import BLOCK_MLX, BLOCK_TORCH  # noqa: E402
from torch_engine import write_model  # noqa: E402  (the benchmarks' SmolLM-135M shape)

RUN = (
    "import resource, sys\n"
    "from finetune.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def write_adapter(model: Path, out: Path) -> Path:
    import numpy as np

    from finetune.core import lora, modelinfo
    from finetune.core.adapters import AdapterSpec, block_shapes
    from finetune.shell.export import adapters

    facts = modelinfo.facts(json.loads((model / "config.json").read_text())).unwrap()
    shapes = block_shapes(facts.linear_shapes(), facts.architecture.blocks, facts.num_layers)
    rng = np.random.default_rng(0)
    params = {k: (0.2 * rng.standard_normal(v.shape)).astype(np.float32) if k.endswith(".lora_b") else v
              for k, v in lora.init(0, shapes, 8).items()}
    spec = AdapterSpec(rank=8, scale=2.0, keys=tuple(facts.linear_shapes()), num_layers=-1, model=str(model))
    adapters.save(out, params, spec, "llama")
    return out


def quantized(model: Path, out: Path) -> Path:
    """`model` quantized to 4 bits, group size 64, in mlx-lm's layout (as `mlx_lm convert -q`)."""
    import shutil

    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    import finetune

    lm = finetune.load(str(model))[0]
    nn.quantize(lm, group_size=64, bits=4)
    out.mkdir()
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(lm.parameters())), metadata={"format": "mlx"})
    config = json.loads((model / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "quantization": {"group_size": 64, "bits": 4}}))
    for f in model.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, out / f.name)
    return out


def run(kind: str, model: Path, adapter: Path, out: Path, old: Path | None) -> tuple[float, float]:
    """(seconds, peak GB) of one `ft fuse` in a fresh process."""
    prelude = {"mlx": "", "torch": BLOCK_MLX, "numpy": BLOCK_MLX + BLOCK_TORCH, "before": ""}[kind]
    args = ["fuse", str(model), "--adapter", str(adapter), "--output", str(out), "--force"]
    args += [] if kind == "before" else ["--backend", {"mlx": "mlx", "torch": "torch", "numpy": "auto"}[kind]]
    env = {k: v for k, v in os.environ.items() if k != "FT_BACKEND"}
    if kind == "before":
        env["PYTHONPATH"] = str(old)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", prelude + RUN, *args], capture_output=True, text=True, env=env,
                          cwd=old if kind == "before" else ROOT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{kind}: {done.stderr}")
    rss = next(int(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("MAXRSS"))
    return seconds, rss * 1024 / 1e9


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", default="", help="a commit whose ft fuse to time as well")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = {"float32": write_model("smollm", root)}
        models["4-bit"] = quantized(models["float32"], root / "model-4bit")
        adapter = write_adapter(models["float32"], root / "adapter")
        old = None
        if options.before:
            old = root / "before"
            old.mkdir()
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", options.before, "finetune"], capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
        kinds = ["mlx", "torch", "numpy"] + (["before"] if old else [])
        times: dict[str, list[tuple[float, float]]] = {f"{m} {k}": [] for m in models for k in kinds}
        for _ in range(options.rounds):
            for name, model in models.items():
                for kind in kinds:
                    times[f"{name} {kind}"].append(run(kind, model, adapter, root / f"out-{kind}", old))
        results: dict[str, object] = {
            k: {"seconds": round(statistics.median(s for s, _ in v), 2), "peak_gb": round(statistics.median(m for _, m in v), 3)}
            for k, v in times.items()}
    results["before_commit"] = options.before
    print(json.dumps(results, indent=2))
    (ROOT / "benchmarks" / "results-fuse.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
