"""Where the torch engine computes (CUDA, then MPS, then the CPU), in which dtype, and one line
saying so in the format of the MLX engine's backend line."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch

from finetune.engines import choose
from finetune.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# CPU flags of native bf16 arithmetic (AVX512_BF16, Intel AMX).
BF16_FLAGS = choose.BF16_FLAGS


def pick(device: str | None = None) -> torch.device:
    """`device` ("cpu", "gpu", None = the best available): CUDA, then MPS, then the CPU."""
    assert device in (None, "cpu", "gpu"), device
    if device != "cpu":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        if device == "gpu":
            raise UserError("--device gpu: torch sees no GPU (no CUDA, no MPS); use --device cpu")
    return torch.device("cpu")


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively here (not emulated in float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(f in choose.cpu_flags() for f in BF16_FLAGS)
    return False


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    """The base model's dtype; `auto` is bf16 where bf16 is native, else float32.

    LoRA factors (a full fine-tune's trained blocks) and optimizer state stay float32 whatever the base holds.
    """
    if requested == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if requested not in DTYPES:
        raise UserError(f"$.model.dtype: {requested!r} is not one of auto, {', '.join(DTYPES)}")
    if requested == "float16" and device.type == "cpu":
        raise UserError("$.model.dtype: float16 has no fast CPU kernels in torch; use bfloat16 or float32 on the CPU")
    return DTYPES[requested]


def compile_blocker(device: torch.device) -> str:
    """Why torch.compile cannot run on `device` here ('' when it can)."""
    if device.type == "mps":
        return "torch.compile does not train on MPS"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return "" if has_triton() else "torch.compile on CUDA needs Triton, which is not installed"
    compilers = ("cl",) if sys.platform == "win32" else ("c++", "g++", "clang++")
    return "" if any(shutil.which(c) for c in compilers) else "torch.compile on the CPU needs a C++ compiler on PATH"


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 1e9
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError):  # sysconf names missing on this platform
        return 0.0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return "unknown"


def describe(device: torch.device, dtype: torch.dtype, why: str = "") -> str:
    """One line for stderr: engine, device, memory, threads, compute dtype (and why this engine)."""
    base = str(dtype).removeprefix("torch.")
    compute = f"{base} base, float32 trained parameters and optimizer" if dtype != torch.float32 else "float32 compute"
    if device.type == "cuda":
        where = f"cuda GPU ({torch.cuda.get_device_name(device)}, {memory_gb(device):.1f} GB)"
    elif device.type == "mps":
        where = f"mps GPU ({memory_gb(device):.1f} GB unified)"
    else:
        where = f"cpu ({_cpu_name()}, {os.cpu_count() or 1} cores, {memory_gb(device):.1f} GB), {torch.get_num_threads()} threads"
    line = f"backend: torch {torch.__version__} on {where}, {compute}"
    return f"{line} ({why})" if why else line
