"""An optimized BLAS for MLX on Linux CPUs, loaded into this process before MLX: find, load, report.

The `mlx[cpu]` wheel bundles the reference BLAS (~6 GFLOP/s for a 1024^2 float32 matmul on a 2-core
EPYC). MLX's library binds `cblas_sgemm` through the process's global symbol scope first, so a
library opened with RTLD_GLOBAL *before* `mlx.core` is first imported serves every float32 matmul
(~200 GFLOP/s with OpenBLAS or MKL). `boot()` does that once, when `finetune` is imported.
This module imports no MLX (only `matmul_gflops` and `__main__` do, after loading).
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from platform import machine as host_machine

from msgspec import Struct

# `python -m finetune.engines.mlx.blas` runs this file as __main__ after `import finetune` imported it
# (to boot); runpy's warning about that is expected, and `_main` reads the booted module.
warnings.filterwarnings("ignore", r"'finetune\.shell\.blas' found in sys\.modules", RuntimeWarning)

SYMBOL = "cblas_sgemm"  # what MLX calls for float32 matmuls
HINT = (
    "MLX's bundled BLAS is slow: reinstall finetune (it brings the `mkl` wheel on Linux x86_64), "
    "or apt-get install libopenblas0-pthread (Debian/Ubuntu) / dnf install openblas-threads (Fedora)"
)
LATE = "mlx.core was imported before finetune, too late to load a BLAS: import finetune first"
PYPI_MKL = "PyPI mkl"
# MKL's threading layer. MLX already runs CPU work on its own threads; MKL's OpenMP layers (INTEL,
# GNU) spin in barriers against them and trained `tiny` up to 8x slower on a busy 2-core machine,
# while SEQUENTIAL never lost to them here (benchmarks/README.md). MKL_THREADING_LAYER overrides.
MKL_THREADING = "SEQUENTIAL"


def candidates(machine: str) -> tuple[tuple[str, str], ...]:
    """(label, path below /) of system BLAS libraries, most preferred first.

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


def wheel_libraries(prefix: str | Path) -> list[Path]:
    """`libmkl_rt.so.N` that the PyPI `mkl` wheel put under the environment's `lib/`, newest first."""
    found = Path(prefix, "lib").glob("libmkl_rt.so.*")
    return sorted(found, key=lambda p: [int(x) for x in p.name.split(".so.")[1].split(".") if x.isdigit()], reverse=True)


def find(root: str | Path = "/", machine: str | None = None, prefix: str | Path | None = None) -> list[tuple[str, Path]]:
    """(label, path) of optimized BLAS libraries that really export cblas_sgemm, in search order:
    the system's (under `root`), then the PyPI mkl wheel's (under the environment `prefix`)."""
    machine = machine or host_machine()
    system = [(label, Path(root, rel)) for label, rel in candidates(machine)]
    wheel = [("MKL", p) for p in wheel_libraries(sys.prefix if prefix is None else prefix)]
    return [(label, p) for label, p in system + wheel if p.is_file() and exports(p)]


class Loaded(Struct, frozen=True):
    """What `boot` did: the library now serving MLX's float32 matmuls ("" = bundled) and why."""

    path: str = ""
    source: str = ""  # system | PyPI mkl | FT_BLAS | LD_PRELOAD
    note: str = ""  # why nothing was loaded, when nothing was
    error: str = ""  # a refused FT_BLAS setting, one line


_LOADED: Loaded | None = None


def boot(env: Mapping[str, str] | None = None) -> Loaded:
    """Load the best BLAS with RTLD_GLOBAL unless MLX is already imported; once per process.

    FT_BLAS=bundled keeps MLX's own; FT_BLAS=/path/lib.so forces that file; FT_BLAS_SEARCH_ROOT
    replaces `/` in the system search (benchmarks use it to simulate a machine without one).
    Never raises: a refused FT_BLAS is recorded in `error` (`backend.select` reports it).
    """
    global _LOADED
    if _LOADED is None:
        _LOADED = _boot(os.environ if env is None else env)
    return _LOADED


def _boot(env: Mapping[str, str]) -> Loaded:
    if not sys.platform.startswith("linux"):
        return Loaded(note="not Linux")
    setting = env.get("FT_BLAS", "")
    already = active()
    if already:  # LD_PRELOAD, or a library the host program loaded globally
        return Loaded(already, "LD_PRELOAD")
    if setting == "bundled":
        return Loaded(note="FT_BLAS=bundled")
    if "mlx.core" in sys.modules:
        return Loaded(note=LATE)
    if setting not in ("", "auto"):
        if not Path(setting).is_file() or not exports(setting):
            return Loaded(note="FT_BLAS refused", error=f"FT_BLAS={setting}: not a library that exports {SYMBOL}; "
                          "give a BLAS .so path, `auto` or `bundled`")
        failed = _load(setting)
        if failed:
            return Loaded(note="FT_BLAS refused", error=f"FT_BLAS={setting}: {failed}")
        return Loaded(setting, "FT_BLAS")
    notes = []
    for _, path in find(env.get("FT_BLAS_SEARCH_ROOT", "/")):
        failed = _load(str(path))
        if not failed:
            return Loaded(str(path), source(str(path)))
        notes.append(failed if str(path) in failed else f"{path}: {failed}")
    return Loaded(note="; ".join(notes) or "none found")


def _load(path: str, mode: int = os.RTLD_GLOBAL) -> str:
    """Open `path` into the global scope; '' on success, else the loader's reason.

    Libraries that wheels vendor (auditwheel's `*.libs/`) need siblings with hashed names and
    carry no RPATH of their own: a missing dependency found beside `path` is opened first.
    """
    if "mkl_rt" in Path(path).name:
        os.environ.setdefault("MKL_THREADING_LAYER", MKL_THREADING)  # read when MKL starts
    for _ in range(8):
        try:
            ctypes.CDLL(path, mode=mode)
            return ""
        except OSError as err:
            missing = str(err).split(":")[0]
            sibling = Path(path).parent / missing
            if "/" in missing or not sibling.is_file() or _load(str(sibling), os.RTLD_LOCAL):
                return str(err)
    return f"{path}: too many missing dependencies"


def loaded() -> Loaded:
    """What `boot` did in this process (booting now if nothing imported finetune yet)."""
    return _LOADED if _LOADED is not None else boot()


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def active() -> str | None:
    """The file whose cblas_sgemm is in the global scope (what MLX binds to), else None.

    Without a global one the symbol lives only in the library MLX bundles (loaded locally), which
    is what MLX then uses.
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
    name = Path(path).name
    known = {"openblas": "OpenBLAS", "blis": "BLIS", "mkl_rt": "MKL", "flexiblas": "FlexiBLAS"}
    return next((label for part, label in known.items() if part in name.lower()), name)


def source(path: str) -> str:
    """Where a found library comes from: the PyPI mkl wheel (in this environment) or the system."""
    return PYPI_MKL if Path(path).parent == Path(sys.prefix, "lib") else "system"


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


def _main() -> None:
    """`python -m finetune.engines.mlx.blas`: the search order, what was loaded, and how fast it is."""
    from finetune.engines.mlx import blas as booted

    for name, path in find(os.environ.get("FT_BLAS_SEARCH_ROOT", "/")):
        print(f"found   {name}: {path}")
    done = booted.loaded()
    print(f"loaded  {done.path or 'bundled with MLX'} {done.source or done.note}")
    print(f"active  {active() or 'bundled with MLX'}")
    for kind in ("float32", "bfloat16"):
        print(f"{kind:9} {matmul_gflops(dtype=kind, repeats=5 if kind == 'float32' else 1):.1f} GFLOP/s (1024x1024)")


if __name__ == "__main__":
    _main()
