"""The torch engine's memory: its measured peak, its estimate, the plan against --memory-limit.

The estimate is the core's (`core.memory.estimate`) with this engine's own copy counts
(`COPIES`, fitted to measured peaks of real train steps by `benchmarks/torch_memory.py`) plus,
on the CPU, what the process holds before the weights load (the interpreter, torch, the data):
the limit bounds the process's peak resident memory there, and torch's allocated memory on CUDA.
"""

from __future__ import annotations

import contextlib
import resource
import sys
from pathlib import Path

import msgspec
import torch
from returns.result import Result

from finetune.core import memory, memplan
from finetune.core.config import Recipe
from finetune.core.modelinfo import ModelFacts
from finetune.core.tokenize import Tokens
from finetune.engines import rundir
from finetune.shell.paths import write_text

# Copies of each activation term (core.memory.activation_terms) the torch engine keeps at its peak
# on the CPU, float32 (fitted; see the module docstring).
COPIES = {
    "saved_mlp": 7.7,
    "saved_scores": 0.12,
    "inputs": 1.0,
    "block_mlp": 10.0,
    "block_scores": 3.5,
    "logits": 3.5,
    "adapter_inner": 0.5,
}
_STATUS, _CLEAR = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def _status_gb(field: str) -> float | None:
    """A `kB` field of /proc/self/status (Linux) in GB, or None."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / memory.GB
    except OSError:
        pass
    return None


def peak_gb(device: torch.device) -> float:
    """The peak since the last `reset_peak`: torch's allocations on CUDA, else the process's
    resident memory (VmHWM; ru_maxrss, never reset, where there is no procfs)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / memory.GB
    hwm = _status_gb("VmHWM")
    if hwm is not None:
        return hwm
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024) / memory.GB


def reset_peak(device: torch.device) -> None:
    """Start a new peak (Linux: `5` into /proc/self/clear_refs resets VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):  # no procfs: the peak stays the process's
        _CLEAR.write_text("5")


def process_gb(device: torch.device) -> float:
    """What the limit already holds before the weights load: the resident set on the CPU, 0 on CUDA."""
    if device.type == "cuda":
        return 0.0
    return _status_gb("VmRSS") or 0.0


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32")


def estimate(facts: ModelFacts, recipe: Recipe, train: list[Tokens], dtype: torch.dtype) -> memory.MemoryEstimate:
    """The peak of the run's largest batch in one step (no split)."""
    batches = memplan.workload(rundir.plan(train, recipe), train, recipe.train.max_seq_length)
    rows, width, chosen = memplan.micro_shape(batches, 1)
    return memory.estimate(facts, recipe, width, dtype_name(dtype), chosen, rows, copies=COPIES)


def plan(recipe: Recipe, facts: ModelFacts, train: list[Tokens], limit_gb: float, dtype: torch.dtype,
         base_gb: float) -> Result[memplan.MemoryPlan, str]:
    """Micro-steps and checkpointing that fit `limit_gb`, `base_gb` of which the process holds already."""
    batches = memplan.workload(rundir.plan(train, recipe), train, recipe.train.max_seq_length)
    return memplan.plan(facts, recipe, batches, limit_gb, dtype_name(dtype), copies=COPIES, reserved_gb=base_gb)


def record(run_dir: Path, p: memplan.MemoryPlan, base_gb: float, measured_gb: float | None = None) -> None:
    """plan.json in the run directory: the plan, its estimate (with `process_gb`) and the peak."""
    row = {**msgspec.to_builtins(p), "effective_batch": p.effective_batch, "process_gb": base_gb,
           "measured_peak_gb": measured_gb, "engine": "torch"}
    write_text(run_dir / "plan.json", msgspec.json.format(msgspec.json.encode(row)).decode() + "\n")


