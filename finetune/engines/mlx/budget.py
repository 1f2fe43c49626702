"""The memory a run may use: the device's budget, the plan against it, MLX's limit, plan.json."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import msgspec
from returns.result import Result

from finetune.core import memory, memplan
from finetune.core.config import Recipe
from finetune.core.modelinfo import ModelFacts
from finetune.core.tokenize import Tokens
from finetune.engines.protocol import plan as batch_plan
from finetune.files.paths import write_text


def device_budget_gb() -> float:
    """Metal's recommended working set on a Mac, a CUDA GPU's memory, else the RAM free now."""
    if mx.metal.is_available():
        return int(mx.device_info().get("max_recommended_working_set_size", 0)) / memory.GB
    if mx.default_device() == mx.gpu:
        return int(mx.device_info().get("memory_size", 0) or mx.device_info().get("total_memory", 0)) / memory.GB
    return _mem_available() / memory.GB


def _mem_available() -> int:
    """MemAvailable of /proc/meminfo (Linux), else the physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:  # no procfs (macOS CPU-only, sandboxes)
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def plan(recipe: Recipe, facts: ModelFacts, train: list[Tokens], limit_gb: float) -> Result[memplan.MemoryPlan, str]:
    """Plan the run's micro-steps against `limit_gb` from the training data's actual batches."""
    batches = memplan.workload(batch_plan(train, recipe), train, recipe.train.max_seq_length)
    dtype = recipe.model.dtype if recipe.model.dtype in memory.BYTES else "float32"
    return memplan.plan(facts, recipe, batches, limit_gb, dtype)


@contextmanager
def enforced(limit_gb: float) -> Iterator[None]:
    """MLX's memory limit (and on Metal the wired limit, as mlx-lm sets it) for the duration."""
    limit = int(limit_gb * memory.GB)
    before = mx.set_memory_limit(limit)
    wired = None
    if mx.metal.is_available():
        recommended = int(mx.device_info().get("max_recommended_working_set_size", 0))
        wired = mx.set_wired_limit(min(limit, recommended))
    try:
        yield
    finally:  # a process that trains twice (tests, notebooks) gets its old limits back
        mx.set_memory_limit(before)
        if wired is not None:
            mx.set_wired_limit(wired)


def record(run_dir: Path, p: memplan.MemoryPlan, measured_gb: float | None = None) -> None:
    """plan.json in the run directory: the plan, its estimate and (after training) the peak."""
    row = {**msgspec.to_builtins(p), "effective_batch": p.effective_batch, "measured_peak_gb": measured_gb}
    write_text(run_dir / "plan.json", msgspec.json.format(msgspec.json.encode(row)).decode() + "\n")
