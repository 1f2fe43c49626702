"""Where MLX computes: Metal GPU, then CUDA GPU (mlx[cuda]), then CPU; and what that means."""

from __future__ import annotations

import os
import sys

import mlx.core as mx
from msgspec import Struct

from finetune.engines.mlx import blas
from finetune.errors import UserError


class BackendInfo(Struct, frozen=True, kw_only=True):
    """The device MLX runs on now, its memory, the BLAS behind CPU matmuls, the compute dtype."""

    device: str  # "gpu" | "cpu"
    api: str  # "metal" | "cuda" | "cpu"
    name: str  # e.g. "Apple M2 Max", "NVIDIA H100", "AMD EPYC"
    memory_gb: float  # device memory (system memory for the CPU); 0 when unknown
    blas: str  # what float32 matmuls run on: OpenBLAS, BLIS, MKL, Accelerate, cuBLAS, ...
    blas_path: str  # the preloaded library's file, when there is one
    fast_blas: bool  # False: MLX's bundled reference BLAS, slow
    dtype: str  # what dtype="auto" loads: "float32" on the CPU, "checkpoint" (its own) on a GPU


def gpu_api() -> str | None:
    """'metal' or 'cuda' when this MLX build can use a GPU here, else None."""
    if mx.metal.is_available():
        return "metal"
    try:
        if mx.cuda.is_available():
            return "cuda"
    except AttributeError:  # MLX builds from before the CUDA backend have no mx.cuda
        pass
    return None


def select(device: str | None = None) -> BackendInfo:
    """Make `device` ("cpu", "gpu", None = the best available) MLX's default and describe it.

    A refused FT_BLAS setting is a UserError here (one line), whatever the device.
    """
    assert device in (None, "cpu", "gpu"), device
    if blas.loaded().error:
        raise UserError(blas.loaded().error)
    api = gpu_api()
    if device == "gpu" and api is None:
        raise UserError(
            "--device gpu: this MLX build sees no GPU (no Metal, no CUDA); "
            "on an NVIDIA machine install mlx[cuda], or use --device cpu"
        )
    use_gpu = api is not None and device != "cpu"
    mx.set_default_device(mx.gpu if use_gpu else mx.cpu)
    info = mx.device_info(mx.gpu if use_gpu else mx.cpu)
    name = str(info.get("device_name", "") or info.get("architecture", "") or "unknown")
    if use_gpu:
        memory = int(info.get("memory_size", 0) or info.get("total_memory", 0) or 0)
        kernels = "Metal kernels" if api == "metal" else "cuBLAS"
        return BackendInfo(device="gpu", api=str(api), name=name, memory_gb=memory / 1e9,
                           blas=kernels, blas_path="", fast_blas=True, dtype="checkpoint")
    library, path = _cpu_blas()
    return BackendInfo(device="cpu", api="cpu", name=name, memory_gb=_system_memory() / 1e9,
                       blas=library, blas_path=path, fast_blas=library != BUNDLED,
                       dtype="float32")


BUNDLED = "MLX's bundled reference BLAS"


def _cpu_blas() -> tuple[str, str]:
    if sys.platform == "darwin":
        return "Accelerate", ""
    if not sys.platform.startswith("linux"):
        return BUNDLED, ""
    used = blas.active()  # what MLX really binds, whatever boot() did
    return (BUNDLED, "") if used is None else (blas.label(used), used)


def _system_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):  # sysconf names missing on this platform
        return 0


def describe(info: BackendInfo, why: str = "") -> str:
    """One line for stderr: device, memory, BLAS (and its file), compute dtype, why MLX; a hint when slow."""
    from finetune.engines.mlx import distributed

    world = distributed.setup()  # joins mlx.launch's ranks; ranks above 0 print nothing from here
    ranks = f", {distributed.describe(world)}" if world.size > 1 else ""
    ranks += f" (MLX engine: {why})" if why else ""  # the choice and its reason, as the torch engine's line
    if info.device == "gpu":
        return f"backend: {info.api} GPU ({info.name}, {info.memory_gb:.1f} GB), {info.blas}{ranks}"
    cores = os.cpu_count() or 1
    line = (
        f"backend: cpu ({info.name}, {cores} cores, {info.memory_gb:.1f} GB), BLAS {_blas_words(info)}, "
        f"float32 compute (bf16/fp16 matmuls are not BLAS-backed on the CPU){ranks}"
    )
    if info.fast_blas or not sys.platform.startswith("linux"):
        return line
    note = blas.loaded().note
    if note == "FT_BLAS=bundled":
        return f"{line} [FT_BLAS=bundled]"
    if note == blas.LATE:
        return f"{line}\nhint: {blas.LATE}"
    failed = "" if note in ("none found", "not Linux") else f" (could not load {note})"
    return f"{line}\nhint: {blas.HINT}{failed}"


def _blas_words(info: BackendInfo) -> str:
    """`OpenBLAS (/usr/lib/..., system)`, `MKL (.../lib/libmkl_rt.so.3, PyPI mkl)`, or the bundled one."""
    if not info.blas_path:
        return info.blas
    done = blas.loaded()
    origin = done.source if done.path == info.blas_path else "LD_PRELOAD"
    return f"{info.blas} ({info.blas_path}, {origin})"
