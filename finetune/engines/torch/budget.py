"""The torch engine's memory: its measured peak, its estimate, the plan against --memory-limit.

The estimate is the core's (`core.memory.estimate`) with this engine's own copy counts
(`COPIES`, fitted to measured peaks of real train steps by `benchmarks/torch_memory.py`), a fixed
share of the first step (`FIXED_GB`) and, on the CPU, what the process holds before the weights
load (the interpreter, torch, the data): the limit bounds the process's peak resident memory
there, and torch's allocated memory on CUDA.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
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
from finetune.engines.protocol import plan as batch_plan
from finetune.files.paths import write_text

# Copies of each activation term (core.memory.activation_terms) the torch engine keeps at its peak
# on the CPU: least squares over 15 measured runs (SmolLM-135M's width, 2, 6 and 30 layers, 2-8 rows
# of 128-512 tokens, checkpointing on and off; `benchmarks/torch_memory.py --grid fit --fit` and
# `--grid quick`, refitted 2026-12-06 with `kernels.install`'s LoRA and attention, errors -20% to
# +29%), then 1.2x so that a plan errs above the peak: saved_mlp 7.1 (per saved block), inputs 4.3
# (per layer, with checkpointing), a fixed 0.03 GB for the first step's allocations. The other terms
# are held at their physical counts (the logits chunk, its softmax and gradient; one block's
# recomputation); the attention terms keep MLX's counts: the fit had no packed rows, where
# attention materialises scores. The fit before the kernels (19.1 and 22.5) overestimated these
# runs 2-3x. A half-precision step's activations count 3 bytes an element, not 2
# (`activation_bytes`): under autocast a bfloat16 base's step kept 71% of a float32 one's (norms,
# LoRA paths and the loss stay float32); with checkpointing, where the saved inputs are bfloat16,
# this overestimates (measured +110% at 30 layers, 8 x 256 tokens).
SAFETY = 1.2
COPIES = {
    "saved_mlp": 7.1 * SAFETY,
    "saved_scores": 0.12,
    "inputs": 4.3 * SAFETY,
    "block_mlp": 1.0,
    "block_scores": 3.5,
    "logits": 3.0,  # the chunk's logits, its softmax and its gradient (float32)
    "adapter_inner": 0.5,
}
FIXED_GB = 0.03 * SAFETY
TRAINED = "float32"  # LoRA factors, and a full fine-tune's blocks of a half-precision base (full.attach)
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


@functools.cache
def _malloc_trim():
    """glibc's `malloc_trim` (hands freed heap back to the system), or None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    with contextlib.suppress(OSError, AttributeError):
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    return None


def process_gb(device: torch.device) -> float:
    """What the limit already holds before the weights load: the resident set on the CPU, 0 on CUDA.

    Garbage is collected and glibc's freed heap handed back first, so that the figure is what the
    process holds, not what it freed moments ago (which varied by tens of MB between runs).
    """
    if device.type == "cuda":
        return 0.0
    gc.collect()
    if (trim := _malloc_trim()) is not None:
        trim(0)
    return _status_gb("VmRSS") or 0.0


def activation_bytes(dtype: torch.dtype | str) -> float:
    """Bytes an activation element counts in the estimate (see COPIES): 4 in float32, 3 in half precision."""
    return 4.0 if dtype in (torch.float32, "float32") else 3.0


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32")


def estimate(facts: ModelFacts, recipe: Recipe, train: list[Tokens], dtype: torch.dtype) -> memory.MemoryEstimate:
    """The peak of the run's largest batch in one step (no split), the first step's fixed share included."""
    batches = memplan.workload(batch_plan(train, recipe), train, recipe.train.max_seq_length)
    rows, width, chosen = memplan.micro_shape(batches, 1)
    est = memory.estimate(facts, recipe, width, dtype_name(dtype), chosen, rows, copies=COPIES, trained_dtype=TRAINED,
                          activation_bytes=activation_bytes(dtype))
    return msgspec.structs.replace(est, activations_gb=est.activations_gb + FIXED_GB, total_gb=est.total_gb + FIXED_GB)


def plan(recipe: Recipe, facts: ModelFacts, train: list[Tokens], limit_gb: float, dtype: torch.dtype,
         base_gb: float) -> Result[memplan.MemoryPlan, str]:
    """Micro-steps and checkpointing that fit `limit_gb`, `base_gb` of which the process holds already."""
    batches = memplan.workload(batch_plan(train, recipe), train, recipe.train.max_seq_length)
    return memplan.plan(facts, recipe, batches, limit_gb, dtype_name(dtype), copies=COPIES, reserved_gb=base_gb + FIXED_GB,
                        trained_dtype=TRAINED, activation_bytes=activation_bytes(dtype))


def record(run_dir: Path, p: memplan.MemoryPlan, base_gb: float, measured_gb: float | None = None) -> None:
    """plan.json in the run directory: the plan, its estimate (with `process_gb`) and the peak."""
    row = {**msgspec.to_builtins(p), "effective_batch": p.effective_batch, "process_gb": base_gb,
           "measured_peak_gb": measured_gb, "engine": "torch"}
    write_text(run_dir / "plan.json", msgspec.json.format(msgspec.json.encode(row)).decode() + "\n")


