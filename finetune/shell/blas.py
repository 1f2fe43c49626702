"""An optimized BLAS for MLX on Linux CPUs: find one, decide whether to preload it, report it.

The `mlx[cpu]` wheel bundles the reference BLAS (~6 GFLOP/s for a 1024^2 fp32 matmul on a 2-core
EPYC); OpenBLAS or BLIS preloaded with LD_PRELOAD take the same matmul to ~200 GFLOP/s.
LD_PRELOAD only acts at process start, so `ft` re-executes itself once with it set (`_entry`).
Importing this module imports no MLX; `plan` is a pure function of its arguments.
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from platform import machine as host_machine
from typing import Literal

from msgspec import Struct

GUARD = "FT_BLAS_PRELOADED"  # set in the re-executed child: never re-exec twice
SYMBOL = "cblas_sgemm"  # what MLX calls for float32 matmuls
HINT = (
    "MLX's bundled BLAS is slow: apt-get install libopenblas0-pthread (Debian/Ubuntu) or "
    "dnf install openblas-threads (Fedora) makes float32 matmuls ~20x faster"
)
_BLAS_NAMES = ("blas", "blis", "mkl_rt", "flexiblas")


def candidates(machine: str) -> tuple[tuple[str, str], ...]:
    """(label, path below /) of optimized BLAS libraries, most preferred first.

    MLX schedules its own CPU work, so pthread builds come before OpenMP and serial ones.
    The Debian paths are checked to export `cblas_sgemm`; `find` re-checks every file.
    """
    lib = f"usr/lib/{machine}-linux-gnu"
    return (
        ("OpenBLAS", f"{lib}/openblas-pthread/libblas.so.3"),  # libopenblas0-pthread
        ("OpenBLAS (OpenMP)", f"{lib}/openblas-openmp/libblas.so.3"),  # libopenblas0-openmp
        ("BLIS", f"{lib}/blis-pthread/libblas.so.3"),  # libblis4-pthread
        ("BLIS (OpenMP)", f"{lib}/blis-openmp/libblas.so.3"),  # libblis4-openmp
        ("OpenBLAS", "usr/lib64/libopenblasp.so.0"),  # Fedora/RHEL openblas-threads
        ("OpenBLAS (OpenMP)", "usr/lib64/libopenblaso.so.0"),  # Fedora/RHEL openblas-openmp
        ("FlexiBLAS", "usr/lib64/libflexiblas.so.3"),  # Fedora's BLAS switch
        ("OpenBLAS", "usr/lib/libopenblas.so.0"),  # Arch
        ("MKL", f"{lib}/libmkl_rt.so"),  # Debian/Ubuntu libmkl-rt
        ("MKL", "opt/intel/oneapi/mkl/latest/lib/libmkl_rt.so.2"),
        ("MKL", "opt/intel/oneapi/mkl/latest/lib/intel64/libmkl_rt.so.2"),
        ("OpenBLAS (1 thread)", f"{lib}/openblas-serial/libblas.so.3"),
        ("BLIS (1 thread)", f"{lib}/blis-serial/libblas.so.3"),
    )


def exports(path: str | Path, symbol: str = SYMBOL) -> bool:
    """Whether the 64-bit little-endian ELF file at `path` defines `symbol` in its dynamic table."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:6] != b"\x7fELF\x02\x01":
                return False
            (shoff,) = struct.unpack_from("<Q", head, 0x28)
            shentsize, shnum = struct.unpack_from("<HH", head, 0x3A)
            f.seek(shoff)
            table = f.read(shentsize * shnum)
            # Section header: name, type, flags, addr, offset, size, link, info, align, entsize.
            sections = [struct.unpack_from("<IIQQQQIIQQ", table, i * shentsize) for i in range(shnum)]
            want = symbol.encode() + b"\0"
            for _, kind, _, _, offset, size, link, *_ in sections:
                if kind != 11:  # SHT_DYNSYM; its `link` is the string table's section
                    continue
                f.seek(sections[link][4])
                names = f.read(sections[link][5])
                f.seek(offset)
                symbols = f.read(size - size % 24)
                at = {i + 1 for i in _find_all(names, b"\0" + want)}
                # Elf64_Sym: name, info, other, section index (0 = undefined), value, size.
                if any(n in at and shndx != 0 for n, _, _, shndx, _, _ in struct.iter_unpack("<IBBHQQ", symbols)):
                    return True
            return False
    except (OSError, struct.error, IndexError):
        return False


def _find_all(data: bytes, needle: bytes) -> list[int]:
    out, i = [], data.find(needle)
    while i >= 0:
        out.append(i)
        i = data.find(needle, i + 1)
    return out


def find(root: str | Path = "/", machine: str | None = None) -> list[tuple[str, Path]]:
    """(label, path) of the optimized BLAS libraries under `root` that really export cblas_sgemm."""
    machine = machine or host_machine()
    found = [(label, Path(root, rel)) for label, rel in candidates(machine)]
    return [(label, p) for label, p in found if p.is_file() and exports(p)]


class Plan(Struct, frozen=True):
    """What `ft` does about BLAS at start: re-exec with `library` preloaded, keep as is, or hint."""

    action: Literal["preload", "keep", "hint"]
    library: str = ""
    reason: str = ""


def plan(platform: str, env: Mapping[str, str], found: Sequence[str], argv: Sequence[str] = ()) -> Plan:
    """Decide from the platform, the environment, the libraries found and the arguments (pure).

    FT_BLAS=bundled keeps MLX's own BLAS; FT_BLAS=/path/lib.so preloads that library.
    """
    setting = env.get("FT_BLAS", "")
    if not platform.startswith("linux"):
        return Plan("keep", reason="not Linux")
    if env.get(GUARD):
        return Plan("keep", env[GUARD], "preloaded by ft")
    if setting == "bundled":
        return Plan("keep", reason="FT_BLAS=bundled")
    preloaded = [p for p in _split(env.get("LD_PRELOAD", "")) if _is_blas(p)]
    if preloaded:
        return Plan("keep", preloaded[0], "already in LD_PRELOAD")
    if not argv or {"-h", "--help", "--version"} & set(argv):
        return Plan("keep", reason="help and version run no matmuls")
    if setting not in ("", "auto"):
        return Plan("preload", setting, "FT_BLAS")
    if not found:
        return Plan("hint", reason=HINT)
    return Plan("preload", found[0], "found")


def _split(value: str) -> list[str]:
    return value.replace(":", " ").split()


def _is_blas(path: str) -> bool:
    name = Path(path).name
    return any(n in name for n in _BLAS_NAMES)


def preload_env(env: Mapping[str, str], library: str) -> dict[str, str]:
    """`env` with `library` first in LD_PRELOAD and the guard set (a new dict)."""
    rest = env.get("LD_PRELOAD", "")
    return {**env, "LD_PRELOAD": f"{library}:{rest}" if rest else library, GUARD: library}


def verbose(env: Mapping[str, str], argv: Sequence[str]) -> bool:
    return env.get("FT_VERBOSE", "") not in ("", "0") or bool({"-v", "--verbose"} & set(argv))


def reexec_with_blas(argv: Sequence[str]) -> None:
    """At `ft` start: re-exec once with an optimized BLAS preloaded, when one is found.

    Says so on stderr only when verbose (`-v` or FT_VERBOSE=1); `ft generate` reports the BLAS
    in its backend line anyway.
    """
    env = os.environ
    linux = sys.platform.startswith("linux")
    search = linux and not env.get(GUARD) and env.get("FT_BLAS", "") in ("", "auto")
    found = [str(p) for _, p in find()] if search else []
    decided = plan(sys.platform, env, found, argv)
    loud = verbose(env, argv)
    if decided.action == "preload":
        if decided.reason == "FT_BLAS" and not exports(decided.library):
            print(f"ft: FT_BLAS={decided.library} does not export {SYMBOL}; ignored", file=sys.stderr)
            return
        child = [sys.executable, "-m", "finetune.cli", *argv]
        try:
            os.execve(sys.executable, child, preload_env(env, decided.library))
        except OSError as err:  # exec failed: carry on in this process with the bundled BLAS
            if loud:
                print(f"ft: could not re-exec with {decided.library}: {err}", file=sys.stderr)
    elif loud and decided.reason == "preloaded by ft":
        if active() is None:  # something between the exec and here dropped LD_PRELOAD
            print(f"ft: BLAS {decided.library} was not preloaded (LD_PRELOAD cleared?)", file=sys.stderr)
        else:
            print(f"ft: BLAS {decided.library} preloaded (FT_BLAS=bundled turns this off)", file=sys.stderr)
    elif loud and decided.action == "hint":
        print(f"ft: hint: {HINT}", file=sys.stderr)


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def active() -> str | None:
    """The file whose cblas_sgemm MLX calls when it is in the global scope (LD_PRELOAD), else None.

    Without a preload the symbol lives only in the library MLX bundles (loaded locally), which is
    what MLX then uses.
    """
    process = ctypes.CDLL(None)
    try:
        function = getattr(process, SYMBOL)
    except AttributeError:  # dlsym found no global definition
        return None
    info = _DlInfo()
    if not process.dladdr(ctypes.cast(function, ctypes.c_void_p), ctypes.byref(info)):
        return None
    return os.fsdecode(info.dli_fname) if info.dli_fname else None


def label(path: str) -> str:
    """A library's name for reports: `OpenBLAS`, `BLIS`, `MKL`, ... or its file name."""
    for name, rel in candidates(host_machine()):
        if path.endswith(rel):
            return name
    return Path(path).name


def matmul_gflops(n: int = 1024, dtype: str = "float32", repeats: int = 5) -> float:
    """Measured GFLOP/s of an (n, n) @ (n, n) matmul on MLX's default device."""
    import time

    import mlx.core as mx

    a = mx.random.normal((n, n), key=mx.random.key(0)).astype(getattr(mx, dtype))
    b = mx.random.normal((n, n), key=mx.random.key(1)).astype(getattr(mx, dtype))
    mx.eval(a, b, a @ b)  # warm up
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(a @ b)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


if __name__ == "__main__":  # `python -m finetune.shell.blas`: what is found, used, and how fast
    for name, path in find():
        print(f"found   {name}: {path}")
    print(f"active  {active() or 'bundled with MLX'}")
    for kind in ("float32", "bfloat16"):
        print(f"{kind:9} {matmul_gflops(dtype=kind, repeats=5 if kind == 'float32' else 1):.1f} GFLOP/s (1024x1024)")
