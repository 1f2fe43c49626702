"""Device selection and BLAS detection: ELF symbol tables of real and written files, search order."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from finetune.engines.mlx import blas
from finetune.engines.mlx import device as backend

MACHINE = "x86_64"
DEBIAN = f"usr/lib/{MACHINE}-linux-gnu"


def write_elf(path: Path, defined=(), undefined=()) -> Path:
    """A minimal 64-bit ELF file whose dynamic symbol table defines/imports the given names."""
    names, symbols = b"\0", [bytes(24)]
    for name, section in [(n, 7) for n in defined] + [(n, 0) for n in undefined]:
        symbols.append(struct.pack("<IBBHQQ", len(names), 0x12, 0, section, 0x1000, 16))
        names += name.encode() + b"\0"
    table = b"".join(symbols)
    strings_at, table_at = 64, 64 + len(names)
    sections_at = table_at + len(table)
    sections = [
        bytes(64),
        struct.pack("<IIQQQQIIQQ", 0, 3, 0, 0, strings_at, len(names), 0, 0, 1, 0),  # .dynstr
        struct.pack("<IIQQQQIIQQ", 0, 11, 0, 0, table_at, len(table), 1, 1, 8, 24),  # .dynsym
    ]
    header = b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack(
        "<HHIQQQIHHHHHH", 3, 62, 1, 0, 0, sections_at, 0, 64, 0, 0, 64, len(sections), 0
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + names + table + b"".join(sections))
    return path


def test_exports_reads_the_dynamic_symbol_table(tmp_path):
    lib = write_elf(tmp_path / "libblas.so.3", defined=["sgemm_", "cblas_sgemm"], undefined=["free"])
    user = write_elf(tmp_path / "libuser.so", undefined=["cblas_sgemm"])
    assert blas.exports(lib) and blas.exports(lib, "sgemm_")
    assert not blas.exports(lib, "free")  # imported, not defined
    assert not blas.exports(lib, "cblas_sgem")  # whole names only
    assert not blas.exports(user)
    (tmp_path / "text.so").write_text("cblas_sgemm\0")
    assert not blas.exports(tmp_path / "text.so") and not blas.exports(tmp_path / "absent.so")


def test_exports_on_a_real_library():
    import mlx.core

    extension = Path(mlx.core.__file__)  # an ELF shared object on Linux, Mach-O on macOS
    linux = sys.platform.startswith("linux")
    assert blas.exports(extension, "PyInit_core") == linux
    assert not blas.exports(extension, "cblas_sgemm")


def test_find_keeps_libraries_that_export_cblas_in_preference_order(tmp_path):
    write_elf(tmp_path / DEBIAN / "blis-pthread/libblas.so.3", defined=["cblas_sgemm"])
    write_elf(tmp_path / DEBIAN / "openblas-openmp/libblas.so.3", defined=["cblas_sgemm"])
    write_elf(tmp_path / DEBIAN / "openblas-pthread/libblas.so.3", undefined=["cblas_sgemm"])
    (tmp_path / "usr/lib64").mkdir(parents=True)
    (tmp_path / "usr/lib64/libopenblasp.so.0").write_text("not a library")
    write_elf(tmp_path / "usr/lib64/libflexiblas.so.3", defined=["cblas_sgemm"])
    env = tmp_path / "venv"  # no PyPI mkl here
    found = blas.find(tmp_path, MACHINE, env)
    assert [(label, p.relative_to(tmp_path).as_posix()) for label, p in found] == [
        ("OpenBLAS (OpenMP)", f"{DEBIAN}/openblas-openmp/libblas.so.3"),
        ("BLIS", f"{DEBIAN}/blis-pthread/libblas.so.3"),
        ("FlexiBLAS", "usr/lib64/libflexiblas.so.3"),
    ]
    assert blas.find(tmp_path, "aarch64", env) == [found[2]]  # Debian paths follow the machine
    assert blas.find(tmp_path / "empty", MACHINE, env) == []


def test_the_pypi_mkl_wheel_comes_after_the_system_newest_first(tmp_path):
    env = tmp_path / "venv"
    write_elf(env / "lib/libmkl_rt.so.2", defined=["cblas_sgemm"])
    write_elf(env / "lib/libmkl_rt.so.10", defined=["cblas_sgemm"])
    write_elf(env / "lib/libmkl_core.so.2", defined=["cblas_sgemm"])  # not the runtime entry
    write_elf(env / "lib/libmkl_rt.so.3", undefined=["cblas_sgemm"])
    system = write_elf(tmp_path / "root" / DEBIAN / "openblas-pthread/libblas.so.3", defined=["cblas_sgemm"])
    found = blas.find(tmp_path / "root", MACHINE, env)
    assert found == [("OpenBLAS", system), ("MKL", env / "lib/libmkl_rt.so.10"), ("MKL", env / "lib/libmkl_rt.so.2")]
    assert blas.find(tmp_path / "none", MACHINE, env)[0] == ("MKL", env / "lib/libmkl_rt.so.10")
    assert blas.label(str(env / "lib/libmkl_rt.so.10")) == "MKL"
    assert blas.label(str(system)) == "OpenBLAS" and blas.source(str(system)) == "system"


def test_backend_selection_reports_the_cpu():
    try:
        info = backend.select("cpu")
        assert (info.device, info.api, info.dtype) == ("cpu", "cpu", "float32")
        assert mx.default_device() == mx.cpu
        assert info.memory_gb > 0 and info.name
        line = backend.describe(info)
        assert line.startswith("backend: cpu (") and "float32 compute" in line
        assert info.fast_blas == (blas.active() is not None or sys.platform == "darwin")
        best = backend.select(None)
        assert best.device == ("gpu" if backend.gpu_api() else "cpu")
    finally:
        mx.set_default_device(mx.gpu if backend.gpu_api() else mx.cpu)


def test_gpu_request_without_a_gpu_is_a_user_error():
    from finetune.errors import UserError

    if backend.gpu_api() is None:
        with pytest.raises(UserError, match="no Metal, no CUDA"):
            backend.select("gpu")
    else:
        assert backend.select("gpu").device == "gpu"
