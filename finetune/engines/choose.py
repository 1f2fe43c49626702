"""`--backend auto|mlx|torch`: which engine trains, and a few words on why (for the backend line).

Only installed packages are looked up (`find_spec`), so choosing imports neither engine.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from pathlib import Path
from typing import NamedTuple

from finetune.errors import UserError

BACKENDS = ("auto", "mlx", "torch")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # CPU flags of native bf16 arithmetic (AVX512_BF16, Intel AMX)
INSTALL_TORCH = "pip install 'finetune-lora[torch]'"
INSTALL_MLX = "pip install mlx (Apple silicon), 'mlx[cpu]' or 'mlx[cuda]' (Linux)"


def installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a broken or blocked install
        return False


def torch_ready() -> bool:
    return installed("torch") and installed("peft")


def nvidia_gpu() -> bool:
    """An NVIDIA driver is loaded (without importing torch or MLX)."""
    return Path("/proc/driver/nvidia/version").exists()


class Machine(NamedTuple):
    """What choosing looks at: which engines are installed, and where we run."""

    mlx: bool
    torch: bool  # torch and peft
    apple_silicon: bool
    nvidia_gpu: bool
    linux_x86: bool
    native_bf16: bool  # AVX512_BF16 or AMX (Linux CPUs)


def this_machine() -> Machine:
    machine = platform.machine()
    flags = cpu_flags()
    return Machine(
        mlx=installed("mlx"), torch=torch_ready(),
        apple_silicon=sys.platform == "darwin" and machine == "arm64",
        nvidia_gpu=nvidia_gpu(),
        linux_x86=sys.platform.startswith("linux") and machine in ("x86_64", "AMD64"),
        native_bf16=bool(flags & set(BF16_FLAGS)),
    )


def decide(requested: str | None = None, needs_mlx: str = "", machine: Machine | None = None,
           needs_torch: str = "") -> tuple[str, str]:
    """(engine, why) for `--backend` (None: `$FT_BACKEND`, else auto); missing engines refused.

    `needs_mlx` names what the run asks for that only the MLX engine has (QLoRA, a quantized
    mlx-lm base, ranks from mlx.launch); `auto` then keeps MLX. `needs_torch`
    names what only the torch engine has (an architecture the MLX engine does not implement).
    """
    requested = requested or os.environ.get("FT_BACKEND") or "auto"
    if requested not in BACKENDS:
        raise UserError(f"--backend {requested}: choose one of {', '.join(BACKENDS)}")
    m = machine or this_machine()
    if requested == "mlx":
        if not m.mlx:
            raise UserError(f"--backend mlx: MLX is not installed here; {INSTALL_MLX}, or use --backend torch")
        return "mlx", "asked for"
    if requested == "torch":
        if not m.torch:
            raise UserError(f"--backend torch: torch and peft are not installed; {INSTALL_TORCH}")
        return "torch", "asked for"
    if not m.mlx and not m.torch:
        raise UserError(f"no training engine installed: {INSTALL_TORCH} (any OS), or {INSTALL_MLX}")
    if not m.mlx:
        return "torch", "auto: MLX is not installed"
    if not m.torch:
        return "mlx", "auto: torch is not installed"
    if needs_torch and not needs_mlx:
        return "torch", f"auto: {needs_torch} needs the torch engine"
    if m.apple_silicon:
        return "mlx", "auto: Apple silicon"
    if needs_mlx:
        return "mlx", f"auto: {needs_mlx} needs the MLX engine"
    if m.nvidia_gpu:
        return "torch", "auto: NVIDIA GPU"
    if m.linux_x86:
        bf16 = "with native bf16, " if m.native_bf16 else ""
        return "torch", f"auto: x86-64 Linux CPU ({bf16}{MEASURED})"
    return "mlx", "auto: MLX is the default where the torch engine was not measured faster"


# benchmarks/README.md, quiet rows: a 2-core AVX512 (native bf16) Linux CPU, at torch's default dtype.
MEASURED = "the torch engine trained 1.0-1.7x faster than MLX-CPU in this project's benchmarks"


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def mlx_only(quantize_bits: int, quantized_base: bool) -> str:
    """What of a run only the MLX engine does, in a few words ("" when either engine can)."""
    if quantize_bits:
        return "QLoRA (--quantize-bits)"
    if quantized_base:
        return "an mlx-lm quantized base"
    if launched_by_mlx():
        return "mlx.launch"
    return ""


class ModelNeeds(NamedTuple):
    """What a model asks of the engine, read from its config.json alone (local or cached)."""

    quantized: bool  # an mlx-lm quantized checkpoint: MLX only
    model_type: str  # "" when unknown (not local, not cached, or no config)
    mlx_knows: bool  # the MLX engine implements this architecture


def model_needs(spec: str, revision: str = "main") -> ModelNeeds:
    """Read `spec`'s config.json without downloading or loading weights (unknown: no constraint)."""
    import json

    from finetune.core import architectures
    from finetune.files import sources

    path = Path(os.path.expanduser(spec))
    directory = path if path.is_dir() else sources.cached_snapshot(spec, revision) if sources.is_hub_id(spec) else None
    if spec == "tiny":
        return ModelNeeds(False, "llama", True)
    try:
        config = json.loads((directory / "config.json").read_text()) if directory else {}
    except (OSError, ValueError):
        config = {}  # loading reports a broken config.json properly
    config = config if isinstance(config, dict) else {}
    kind = str(config.get("model_type") or "")
    return ModelNeeds(bool(config.get("quantization")), kind, not kind or kind in architectures.REGISTRY)


def quantized_base(spec: str, revision: str = "main") -> bool:
    """`spec` is an mlx-lm quantized checkpoint (local or cached; never downloads to find out)."""
    return model_needs(spec, revision).quantized


def for_model(requested: str | None, spec: str, revision: str = "main", *, quantize_bits: int = 0,
              adapter_quantized: bool = False) -> tuple[str, str]:
    """`decide` for a run or command on model `spec`: what the model and the flags need routes `auto`,
    and what the chosen engine cannot do is refused in one line."""
    needs = model_needs(spec, revision)
    mlx_reason = ("an adapter trained on a quantized base" if adapter_quantized
                  else mlx_only(quantize_bits, needs.quantized))
    torch_reason = "" if needs.mlx_knows else f"{needs.model_type} (not an MLX engine architecture)"
    engine, why = decide(requested, mlx_reason, needs_torch=torch_reason)
    if engine == "torch" and (needs.quantized or adapter_quantized or quantize_bits):
        what = "an mlx-lm quantized checkpoint" if needs.quantized else (
            "an adapter trained on a quantized base" if adapter_quantized else "QLoRA (--quantize-bits)")
        raise UserError(f"{spec}: {what}; the torch engine runs float bases only (quantized bases are the "
                        "MLX engine's); use --backend mlx")
    if engine == "mlx" and not needs.mlx_knows:
        from finetune.core.architectures import SUPPORTED

        raise UserError(f"{spec}: architecture {needs.model_type!r} is not implemented by the MLX engine "
                        f"({', '.join(sorted(SUPPORTED))}); use --backend torch ({INSTALL_TORCH})")
    return engine, why


def launched_by_mlx() -> bool:
    """This process is one rank of `mlx.launch` (its launchers set these)."""
    env = os.environ
    return any(k in env for k in ("MLX_RANK", "MLX_HOSTFILE", "MLX_JACCL_COORDINATOR", "OMPI_COMM_WORLD_RANK", "PMI_RANK"))
