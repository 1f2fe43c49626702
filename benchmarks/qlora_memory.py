"""Peak memory of a float vs a quantized base (QLoRA).

Each row runs in fresh subprocesses on a random-initialised model and the bundled SQL data:
loading alone (`load_model`, then `mx.get_peak_memory`), and real `ft train start` steps (LoRA
rank 8 on every linear, batch 4, max_seq_length 256, 3 steps) whose peak is the run's own
`peak_memory_gb` (loading included). Bases: float32, quantized on load (`--quantize-bits 8|4`),
and a 4-bit checkpoint written by `mlx_lm convert -q`. Prints a Markdown table per model.

    python benchmarks/qlora_memory.py [--model tiny|smollm] [--load-only]

MLX's CPU quantized matmul is not BLAS-backed (about 20x slower than a float32 linear here), so
a QLoRA step of the SmolLM-135M-shaped model takes minutes on a 2-core CPU: `--load-only` there.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_vs_mlxlm import write_data, write_model  # noqa: E402

SETTINGS = ("--iters", "3", "--batch-size", "4", "--max-seq-length", "256", "--lora-rank", "8",
            "--report-every", "1", "--eval-every", "0", "--save-every", "0", "--seed", "0")


def load_peak(model: Path, bits: int) -> float:
    """GB at the peak of loading `model` (quantized on load to `bits` when non-zero), in a fresh process."""
    out = subprocess.run([sys.executable, __file__, "--load", str(model), str(bits)], check=True,
                         capture_output=True, text=True).stdout
    return float(out.split()[-1])


def train(model: Path, data: Path, out: Path, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "finetune.cli", "train", "start", str(model), str(data), *SETTINGS,
           "--output", str(out), "--backend", "mlx", *extra]
    subprocess.run(cmd, check=True, capture_output=True)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {"peak_gb": max(m["peak_memory_gb"] for m in metrics), "loss": metrics[-1]["train_loss"],
            "tok_s": metrics[-1]["processed_tokens_per_second"]}


def _load_child(model: str, bits: int) -> None:
    import mlx.core as mx

    from finetune.core import quantization
    from finetune.engines.mlx.load import load_model

    load_model(model, cache=False, quantize=quantization.on_load(bits, 64)).unwrap()
    print(mx.get_peak_memory() / 1e9)


def main() -> None:
    import argparse

    from mlx_lm import convert

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "smollm"), default="tiny")
    parser.add_argument("--load-only", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, data = write_model(args.model, root), write_data(root)
        q4 = root / f"{args.model}-4bit"
        convert(str(model), str(q4), quantize=True, q_bits=4, q_group_size=64, dtype="float32")
        rows = [
            ("float32 base", model, 0),
            ("8-bit, quantized on load (`--quantize-bits 8`)", model, 8),
            ("4-bit, quantized on load (`--quantize-bits 4`)", model, 4),
            ("4-bit checkpoint from `mlx_lm convert -q`", q4, 0),
        ]
        print("| base | peak to load GB | peak of a train step GB | processed tok/s | loss |")
        print("|---|---:|---:|---:|---:|")
        for i, (label, path, bits) in enumerate(rows):
            extra = ("--quantize-bits", str(bits)) if bits else ()
            loaded = load_peak(path, bits)
            if args.load_only:
                print(f"| {label} | {loaded:.3f} | – | – | – |", flush=True)
                continue
            r = train(path, data, root / f"run-{i}", *extra)
            print(f"| {label} | {loaded:.3f} | {r['peak_gb']:.3f} | {r['tok_s']:.1f} | {r['loss']:.3f} |", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--load"]:
        _load_child(sys.argv[2], int(sys.argv[3]))
    else:
        main()
