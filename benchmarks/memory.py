"""Estimated vs measured peak training memory on a SmolLM-135M-shaped model (`just bench`).

The model is built in-process with random weights (SmolLM-135M's shape), quantized on load for
the 4-bit rows as `ft train start --quantize-bits 4` does, and trained for a step by the real
loop on synthetic rows; the peak is `mx.get_peak_memory()` after `mx.reset_peak_memory()` once
the weights are in memory (so they count). Prints a Markdown table.

    python benchmarks/memory.py [--grid quick|full]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from memory_runs import measure  # noqa: E402

from finetune.core import memory, modelinfo  # noqa: E402
from finetune.core.config import Recipe  # noqa: E402

SMOLLM = {
    "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
}
# (batch, padded length, rank, checkpointing, bits)
GRIDS = {
    "quick": [(2, 128, 8, c, q) for q in (0, 4) for c in (False, True)] + [(4, 256, 8, False, 0), (4, 256, 8, True, 0), (1, 512, 64, True, 0)],
    "full": [(b, s, r, c, q) for b, s in ((1, 64), (4, 256), (16, 128), (2, 1024)) for r in (8,) for c in (False, True) for q in (0, 4)],
}


def row(batch: int, seq: int, rank: int, checkpoint: bool, bits: int, supervised: float = 0.5) -> dict:
    recipe = msgspec.convert({"model": {"quantize_bits": bits}, "lora": {"rank": rank}, "train": {
        "batch_size": batch, "iters": 1, "grad_checkpoint": checkpoint, "max_seq_length": 4096, "eval_every": 0}}, Recipe)
    facts = modelinfo.facts(SMOLLM).unwrap()
    chosen = 64 * -(-batch * max(1, int(seq * supervised)) // 64)
    tic = time.perf_counter()
    peak = measure(SMOLLM, recipe, seq, supervised, steps=1) / memory.GB
    est = memory.estimate(facts, recipe, seq, supervised=chosen)
    return {"batch": batch, "seq": seq, "rank": rank, "checkpoint": checkpoint, "bits": bits or 32,
            "weights_gb": est.weights_gb, "estimate_gb": est.total_gb, "measured_gb": peak,
            "error": est.total_gb / peak - 1, "seconds": time.perf_counter() - tic}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", choices=tuple(GRIDS), default="quick")
    args = parser.parse_args()
    print("| batch | padded length | rank | checkpointing | base | weights GB | estimate GB | measured GB | error |")
    print("|---|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for point in GRIDS[args.grid]:
        r = row(*point)
        worst = max(worst, abs(r["error"]))
        base = "float32" if r["bits"] == 32 else f"{r['bits']}-bit"
        print(f"| {r['batch']} | {r['seq']} | {r['rank']} | {'on' if r['checkpoint'] else 'off'} | {base} | "
              f"{r['weights_gb']:.3f} | {r['estimate_gb']:.3f} | {r['measured_gb']:.3f} | {r['error']:+.1%} |", flush=True)
    print(f"\nlargest error {worst:.1%}")


if __name__ == "__main__":
    main()
