"""Device selection and the BLAS preload: detection on real files, the pure decision, real re-execs."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from finetune.shell import backend, blas

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
    found = blas.find(tmp_path, MACHINE)
    assert [(label, p.relative_to(tmp_path).as_posix()) for label, p in found] == [
        ("OpenBLAS (OpenMP)", f"{DEBIAN}/openblas-openmp/libblas.so.3"),
        ("BLIS", f"{DEBIAN}/blis-pthread/libblas.so.3"),
        ("FlexiBLAS", "usr/lib64/libflexiblas.so.3"),
    ]
    assert blas.find(tmp_path, "aarch64") == [found[2]]  # Debian paths follow the machine
    assert blas.find(tmp_path / "empty", MACHINE) == []


LIB = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
ARGS = ("generate", "tiny", "--prompt", "hi")


@pytest.mark.parametrize(
    ("platform", "env", "found", "argv", "action", "library"),
    [
        ("linux", {}, [LIB], ARGS, "preload", LIB),
        ("linux", {}, [LIB, "/other.so"], ARGS, "preload", LIB),
        ("linux", {}, [], ARGS, "hint", ""),
        ("darwin", {}, [LIB], ARGS, "keep", ""),
        ("linux", {"FT_BLAS": "bundled"}, [LIB], ARGS, "keep", ""),
        ("linux", {"FT_BLAS": "/opt/mine/libblis.so"}, [LIB], ARGS, "preload", "/opt/mine/libblis.so"),
        ("linux", {"FT_BLAS": "auto"}, [LIB], ARGS, "preload", LIB),
        ("linux", {blas.GUARD: LIB, "LD_PRELOAD": LIB}, [LIB], ARGS, "keep", LIB),
        ("linux", {blas.GUARD: LIB}, [LIB], ARGS, "keep", LIB),  # never twice, even if lost
        ("linux", {"LD_PRELOAD": "/x/libmkl_rt.so"}, [LIB], ARGS, "keep", "/x/libmkl_rt.so"),
        ("linux", {"LD_PRELOAD": "/x/libjemalloc.so"}, [LIB], ARGS, "preload", LIB),
        ("linux", {}, [LIB], (), "keep", ""),
        ("linux", {}, [LIB], ("--help",), "keep", ""),
        ("linux", {}, [LIB], ("generate", "--help"), "keep", ""),
        ("linux", {}, [LIB], ("--version",), "keep", ""),
    ],
)
def test_plan(platform, env, found, argv, action, library):
    decided = blas.plan(platform, env, found, argv)
    assert (decided.action, decided.library) == (action, library)


def test_preload_env_prepends_and_guards_without_mutating():
    env = {"LD_PRELOAD": "/x/libjemalloc.so", "HOME": "/root"}
    out = blas.preload_env(env, LIB)
    assert out["LD_PRELOAD"] == f"{LIB}:/x/libjemalloc.so" and out[blas.GUARD] == LIB
    assert env == {"LD_PRELOAD": "/x/libjemalloc.so", "HOME": "/root"}
    assert blas.preload_env({}, LIB)["LD_PRELOAD"] == LIB
    assert blas.plan("linux", out, [LIB], ARGS).action == "keep"


def test_verbose():
    assert blas.verbose({"FT_VERBOSE": "1"}, ())
    assert not blas.verbose({"FT_VERBOSE": "0"}, ("generate",))
    assert blas.verbose({}, ("generate", "-v")) and blas.verbose({}, ("--verbose",))


def bundled_blas() -> str:
    """MLX's own reference BLAS (Linux wheels); it exports cblas_sgemm, so it can be preloaded."""
    libs = Path(mx.__file__).parent.parent.parent / "mlx_cpu.libs"
    found = sorted(str(p) for p in libs.glob("libblas*.so*") if blas.exports(p))
    return found[0] if found else ""


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", blas.GUARD, "FT_BLAS", "FT_VERBOSE")}
    return env | extra


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("setting", ["bundled", "auto"])
def test_help_works_with_and_without_the_preload(setting):
    done = run(["-m", "finetune.cli", "--help"], child_env(FT_BLAS=setting))
    assert done.returncode == 0, done.stderr
    assert "generate" in done.stdout and "train" in done.stdout
    preloaded = [lib for lib in (*[str(p) for _, p in blas.find()], bundled_blas()) if lib][:1]
    for lib in preloaded:  # also under a real preload
        done = run(["-m", "finetune.cli", "--help"], child_env(LD_PRELOAD=lib))
        assert done.returncode == 0 and "generate" in done.stdout, done.stderr


def test_ft_reexecs_once_with_the_library_preloaded():
    lib = next((str(p) for _, p in blas.find()), "") or bundled_blas()
    env = child_env(FT_BLAS=lib) if lib else child_env()
    # A cheap real command: bad flags, so it exits 2 right after the re-exec.
    done = run(["-m", "finetune.cli", "generate", "tiny", "-v"], env)
    assert done.returncode == 2
    assert "ft: error: give exactly one of --prompt and --messages" in done.stderr
    expected = blas.plan(sys.platform, env, [lib] if lib else [], ["generate", "-v"])
    lines = done.stderr.splitlines()
    if expected.action == "preload":
        assert lines[0] == f"ft: BLAS {lib} preloaded (FT_BLAS=bundled turns this off)"
    else:
        assert not any("preloaded" in line for line in lines)
    quiet = run(["-m", "finetune.cli", "generate", "tiny"], env)
    assert quiet.stderr.splitlines() == lines[-1:]  # without -v only the error line


def test_mlx_really_calls_the_preloaded_library():
    code = (
        "import mlx.core as mx\n"
        "from finetune.shell import blas\n"
        "mx.eval(mx.ones((64, 64)) @ mx.ones((64, 64)))\n"
        "print(blas.active())\n"
    )
    assert run(["-c", code], child_env()).stdout.strip() == "None"
    for lib in [str(p) for _, p in blas.find()] + [bundled_blas()]:
        if lib:
            assert run(["-c", code], child_env(LD_PRELOAD=lib)).stdout.strip() == lib


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
