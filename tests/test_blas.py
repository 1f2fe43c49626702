"""The in-process BLAS load, in fresh interpreters: what `import finetune` loads, what MLX binds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx

from finetune.engines.mlx import blas

REPORT = (
    "import json, finetune, mlx.core as mx\n"
    "from finetune.engines.mlx import blas, device as backend\n"
    "mx.eval(mx.ones((64, 64)) @ mx.ones((64, 64)))\n"
    "done = blas.loaded()\n"
    "print(json.dumps({'active': blas.active(), 'path': done.path, 'source': done.source,\n"
    "                  'note': done.note, 'line': backend.describe(backend.select('cpu'))}))\n"
)


def bundled_blas() -> str:
    """MLX's own reference BLAS file (Linux wheels): it exports cblas_sgemm, so it can be loaded globally."""
    libs = Path(mx.__file__).parent.parent / "mlx_cpu.libs"  # beside mlx/ in site-packages
    return next(str(p) for p in sorted(libs.glob("libblas*.so*")) if blas.exports(p))


def env(**extra: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "FT_BLAS")}
    return keep | extra


def python(code: str, environ: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=120)


def report(environ: dict[str, str], code: str = REPORT) -> dict:
    done = python(code, environ)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


ROOT = os.environ.get("FT_BLAS_SEARCH_ROOT", "/")  # set: this machine's system libraries hidden


def test_import_finetune_loads_the_first_library_found_and_mlx_uses_it():
    found = blas.find(ROOT)
    got = report(env())
    if found:
        assert got["active"] == got["path"] == str(found[0][1])
        assert got["source"] == blas.source(str(found[0][1]))
        assert f"BLAS {found[0][0]} ({found[0][1]}, {got['source']})" in got["line"]
    else:
        assert got["active"] is None and "hint:" in got["line"]


def mlx_binds(environ: dict[str, str], trace: Path) -> tuple[dict, set[str]]:
    """The report, and the files the dynamic linker bound libmlx's cblas_sgemm to (its own record)."""
    got = report(environ | {"LD_DEBUG": "bindings", "LD_DEBUG_OUTPUT": str(trace)})
    lines = [line for f in trace.parent.glob(trace.name + "*") for line in f.read_text().splitlines()]
    # "binding file .../libmlx.so [0] to /usr/lib/.../libblas.so.3 [0]: normal symbol `cblas_sgemm'"
    mlx = [line.split(" to ")[1].split(" [")[0] for line in lines if "`cblas_sgemm'" in line and "libmlx" in line]
    return got, {os.path.realpath(target) for target in mlx}


def test_ft_blas_forces_a_library_and_mlx_binds_its_cblas_sgemm(tmp_path):
    found = blas.find(ROOT)  # a real optimized BLAS (system or PyPI mkl) when there is one
    lib = str(found[0][1]) if found else bundled_blas()
    got, targets = mlx_binds(env(FT_BLAS=lib), tmp_path / "forced")
    assert (got["active"], got["path"], got["source"]) == (lib, lib, "FT_BLAS")
    assert f"({lib}, FT_BLAS)" in got["line"]
    assert targets == {os.path.realpath(lib)}
    got, targets = mlx_binds(env(FT_BLAS="bundled"), tmp_path / "bundled")
    assert got["active"] is None and targets == {os.path.realpath(bundled_blas())}


def test_bundled_keeps_mlx_own_blas():
    got = report(env(FT_BLAS="bundled"))
    assert got["active"] is None and got["path"] == "" and got["note"] == "FT_BLAS=bundled"
    assert "BLAS MLX's bundled reference BLAS" in got["line"] and got["line"].endswith("[FT_BLAS=bundled]")


def test_a_bad_ft_blas_is_one_line_and_exit_2(tmp_path):
    text = tmp_path / "libnot.so"
    text.write_text("cblas_sgemm")
    for setting in (str(text), str(tmp_path / "absent.so")):
        done = subprocess.run([sys.executable, "-m", "finetune.cli", "generate", "tiny", "--prompt", "hi"],
                              env=env(FT_BLAS=setting), capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and done.stdout == ""
        assert done.stderr.splitlines() == [
            f"ft: error: FT_BLAS={setting}: not a library that exports cblas_sgemm; give a BLAS .so path, `auto` or `bundled`"
        ]


def test_mlx_imported_first_is_reported_with_the_fix():
    got = report(env(), "import mlx.core\n" + REPORT)
    assert got["active"] is None and got["path"] == "" and got["note"] == blas.LATE
    assert got["line"].endswith(f"hint: {blas.LATE}")


def test_a_found_library_that_fails_to_load_is_skipped(tmp_path):
    from tests.test_backend import DEBIAN, write_elf  # a real ELF file the loader refuses

    broken = write_elf(tmp_path / DEBIAN / "openblas-pthread/libblas.so.3", defined=["cblas_sgemm"])
    got = report(env(FT_BLAS_SEARCH_ROOT=str(tmp_path)))
    wheel = blas.find(tmp_path / "none")  # what remains: the PyPI mkl wheel, when installed
    assert got["path"] == (str(wheel[0][1]) if wheel else "")
    if not wheel:
        assert str(broken) in got["note"] and got["active"] is None
        assert f"(could not load {broken}: " in got["line"]


def test_import_finetune_imports_no_mlx_and_no_transformers():
    code = "import sys, finetune\nprint(sorted({m.split('.')[0] for m in sys.modules} & {'mlx', 'transformers', 'torch', 'numpy'}))"
    done = python(code, env())
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


def test_a_vendored_library_loads_with_its_hashed_siblings(tmp_path):
    # auditwheel's libgfortran needs libquadmath-<hash> and has no RPATH: found beside it, or refused.
    libs = Path(mx.__file__).parent.parent / "mlx_cpu.libs"
    fortran = next(libs.glob("libgfortran-*.so*"))
    quadmath = next(libs.glob("libquadmath-*.so*"))
    (tmp_path / "alone").mkdir()
    (tmp_path / "alone" / fortran.name).write_bytes(fortran.read_bytes())
    (tmp_path / "both").mkdir()
    for lib in (fortran, quadmath):
        (tmp_path / "both" / lib.name).write_bytes(lib.read_bytes())
    code = "import sys\nfrom finetune.engines.mlx import blas\nprint(repr(blas._load(sys.argv[1])))"
    for where, expected in (("both", "''"), ("alone", quadmath.name)):
        done = subprocess.run([sys.executable, "-c", code, str(tmp_path / where / fortran.name)],
                              env=env(FT_BLAS="bundled"), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and expected in done.stdout, done.stdout + done.stderr
