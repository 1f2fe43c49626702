"""What `pip install finetune-lora` and `finetune-lora[torch]` bring on each platform (pyproject's markers).

Evaluated with `packaging`, the library pip itself uses for markers, for each platform's
environment: MLX only where it publishes wheels, the mkl wheel only on x86-64 Linux, and on
Windows and Intel Macs a base install with no engine (then `[torch]` brings one).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

PYPROJECT = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]

PLATFORMS = {
    "linux-x86_64": {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix"},
    "linux-aarch64": {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "aarch64", "os_name": "posix"},
    "mac-arm64": {"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "arm64", "os_name": "posix"},
    "mac-x86_64": {"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "x86_64", "os_name": "posix"},
    "windows": {"sys_platform": "win32", "platform_system": "Windows", "platform_machine": "AMD64", "os_name": "nt"},
}


def brought(platform: str, extra: str = "") -> dict[str, str]:
    """name -> `name[extras] specifier` of what installing (with `extra`) pulls in on `platform`."""
    env = {"python_version": "3.11", "python_full_version": "3.11.9", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "platform_release": "", "platform_version": "",
           **PLATFORMS[platform]}
    wanted = [*PYPROJECT["dependencies"], *(PYPROJECT["optional-dependencies"][extra] if extra else [])]
    out = {}
    for line in wanted:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({**env, "extra": extra}):
            extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
            out[req.name] = f"{req.name}{extras}{req.specifier}"
    return out


@pytest.mark.parametrize(("platform", "mlx", "mkl"), [
    ("linux-x86_64", "mlx[cpu]>=0.29", True),
    ("linux-aarch64", "mlx[cpu]>=0.29", False),
    ("mac-arm64", "mlx>=0.29", False),
    ("mac-x86_64", None, False),
    ("windows", None, False),
])
def test_mlx_and_mkl_only_where_they_have_wheels(platform, mlx, mkl):
    base = brought(platform)
    assert base.get("mlx") == mlx
    assert ("mkl" in base) == mkl
    assert "torch" not in base and "peft" not in base  # the engine is an extra
    for name in ("transformers", "safetensors", "numpy", "msgspec", "cyclopts", "returns"):
        assert name in base, (platform, name)


@pytest.mark.parametrize("platform", list(PLATFORMS))
def test_the_torch_extra_brings_an_engine_everywhere(platform):
    with_torch = brought(platform, "torch")
    assert "peft" in with_torch
    if platform == "mac-x86_64":  # PyTorch's last Intel-Mac wheels: 2.2.x, built against NumPy 1
        assert with_torch["torch"] == "torch<2.3,>=2.2" and with_torch["numpy"] == "numpy<2"
    else:
        assert with_torch["torch"] == "torch==2.13.0"


def test_with_no_engine_ft_says_what_to_install():
    from finetune.engines.choose import Machine, decide
    from finetune.errors import UserError

    windows = Machine(mlx=False, torch=False, apple_silicon=False, nvidia_gpu=False, linux_x86=False, native_bf16=False)
    with pytest.raises(UserError) as err:
        decide("auto", machine=windows)
    assert str(err.value) == ("no training engine installed: pip install 'finetune-lora[torch]' (any OS), or pip install "
                              "mlx (Apple silicon), 'mlx[cpu]' or 'mlx[cuda]' (Linux)")
