"""`ft generate` with the MLX engine vs the torch engine: decode and prompt tokens/s, same text.

Each round runs `ft generate MODEL --backend mlx|torch --device cpu` (greedy, float32 on the CPU in
both engines) as a subprocess, engines alternating; reported are medians of the speeds the command
prints on stderr and whether both engines streamed the same text. Models: random-initialised
Llamas of the tiny and SmolLM-135M shapes (benchmarks/torch_engine.py writes them).

    python benchmarks/generate_engines.py [--models tiny,smollm] [--rounds 3] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from torch_engine import write_model  # noqa: E402  (the same random tiny and SmolLM-135M-shaped Llamas)

PROMPT = " ".join(["SELECT name , age FROM users WHERE city = 'Paris' AND age > 30 ;"] * 6)
SPEED = re.compile(r"^(\d+) tokens, ([\d.]+) tokens/s \(prompt: (\d+) tokens, ([\d.]+) tokens/s\)$", re.M)


def run(model: Path, engine: str, max_tokens: int) -> dict:
    cmd = [sys.executable, "-m", "finetune.cli", "generate", str(model), "--prompt", PROMPT,
           "--max-tokens", str(max_tokens), "--backend", engine, "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    tokens, rate, prompt, prompt_rate = SPEED.search(done.stderr).groups()
    return {"tokens": int(tokens), "decode_tps": float(rate), "prompt_tokens": int(prompt),
            "prompt_tps": float(prompt_rate), "text": done.stdout}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,smollm")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results-generate-engines.json"))
    a = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models.split(","):
            model = write_model(name, Path(tmp))
            runs: dict[str, list[dict]] = {"mlx": [], "torch": []}
            for _ in range(a.rounds):
                for engine in runs:
                    runs[engine].append(run(model, engine, a.max_tokens))
            summary = {
                engine: {k: statistics.median(r[k] for r in rs) for k in ("decode_tps", "prompt_tps", "tokens", "prompt_tokens")}
                for engine, rs in runs.items()
            }
            summary["same_text"] = all(r["text"] == runs["mlx"][0]["text"] for rs in runs.values() for r in rs)
            results[name] = summary
            print(name, json.dumps(summary), flush=True)
    Path(a.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
