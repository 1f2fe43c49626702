"""Peak training memory of a float vs a quantized base (QLoRA) on a SmolLM-135M-shaped model.

Every row is a real `ft train start` subprocess on the same random-initialised model and the
bundled SQL data (LoRA rank 8 on every linear, batch 2, max_seq_length 128, 2 steps); the peak
is the run's own `peak_memory_gb` (mx.get_peak_memory, weights included). Rows: the float32
base, quantized on load (`--quantize-bits 8|4`), a 4-bit checkpoint written by `mlx_lm convert -q`,
and 4-bit with gradient checkpointing. Prints a Markdown table.

    python benchmarks/qlora_memory.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_vs_mlxlm import write_data, write_model  # noqa: E402

SETTINGS = ("--iters", "2", "--batch-size", "2", "--max-seq-length", "128", "--lora-rank", "8",
            "--report-every", "1", "--eval-every", "0", "--save-every", "0", "--seed", "0")


def train(model: Path, data: Path, out: Path, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "finetune.cli", "train", "start", str(model), str(data), *SETTINGS,
           "--output", str(out), *extra]
    subprocess.run(cmd, check=True, capture_output=True, env=os.environ.copy())
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {"peak_gb": max(m["peak_memory_gb"] for m in metrics), "loss": metrics[-1]["train_loss"],
            "tok_s": metrics[-1]["processed_tokens_per_second"]}


def main() -> None:
    from mlx_lm import convert

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, data = write_model("smollm", root), write_data(root)
        q4 = root / "smollm-4bit"
        convert(str(model), str(q4), quantize=True, q_bits=4, q_group_size=64, dtype="float32")
        rows = [
            ("float32 base", model, ()),
            ("8-bit, quantized on load (--quantize-bits 8)", model, ("--quantize-bits", "8")),
            ("4-bit, quantized on load (--quantize-bits 4)", model, ("--quantize-bits", "4")),
            ("4-bit checkpoint from `mlx_lm convert -q`", q4, ()),
            ("4-bit on load + --grad-checkpoint", model, ("--quantize-bits", "4", "--grad-checkpoint")),
        ]
        print("| base | peak memory GB | processed tok/s | train loss at step 2 |")
        print("|---|---:|---:|---:|")
        for i, (label, path, extra) in enumerate(rows):
            r = train(path, data, root / f"run-{i}", *extra)
            print(f"| {label} | {r['peak_gb']:.3f} | {r['tok_s']:.0f} | {r['loss']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
