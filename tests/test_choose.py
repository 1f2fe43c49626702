"""`--backend auto` picks the engine this project measured faster, unless the run needs MLX."""

from __future__ import annotations

import json

import pytest

from finetune.engines import choose
from finetune.engines.choose import Machine, decide
from finetune.errors import UserError

LINUX_CPU = Machine(mlx=True, torch=True, apple_silicon=False, nvidia_gpu=False, linux_x86=True, native_bf16=True)


@pytest.fixture(autouse=True)
def no_pinned_backend(monkeypatch):
    monkeypatch.delenv("FT_BACKEND", raising=False)  # conftest pins mlx for the rest of the suite


def with_(**facts) -> Machine:
    return LINUX_CPU._replace(**facts)


def test_auto_on_a_linux_cpu_is_torch_and_says_why():
    assert decide(machine=LINUX_CPU) == ("torch", f"auto: x86-64 Linux CPU (with native bf16, {choose.MEASURED})")
    engine, why = decide(machine=with_(native_bf16=False))
    assert engine == "torch" and "native bf16" not in why


@pytest.mark.parametrize(("needs", "why"), [
    (choose.mlx_only(4, False), "auto: QLoRA (--quantize-bits) needs the MLX engine"),
    (choose.mlx_only(0, True), "auto: an mlx-lm quantized base needs the MLX engine"),
])
def test_auto_keeps_mlx_for_what_only_mlx_does(needs, why):
    assert decide(None, needs, LINUX_CPU) == ("mlx", why)
    assert decide(None, needs, with_(nvidia_gpu=True)) == ("mlx", why)
    assert decide("torch", needs, LINUX_CPU) == ("torch", "asked for")  # the engine itself refuses, in one line


def test_auto_elsewhere():
    assert decide(machine=with_(apple_silicon=True, linux_x86=False)) == ("mlx", "auto: Apple silicon")
    assert decide(machine=with_(nvidia_gpu=True)) == ("torch", "auto: NVIDIA GPU")
    assert decide(machine=with_(nvidia_gpu=True, torch=False)) == ("mlx", "auto: torch is not installed")
    assert decide(machine=with_(mlx=False, apple_silicon=True)) == ("torch", "auto: MLX is not installed")
    assert decide(machine=with_(linux_x86=False))[0] == "mlx"  # e.g. aarch64 Linux: not measured


def test_env_and_missing_engines(monkeypatch):
    monkeypatch.setenv("FT_BACKEND", "mlx")
    assert decide(machine=LINUX_CPU) == ("mlx", "asked for")
    with pytest.raises(UserError, match="--backend torch: torch and peft are not installed; pip install 'finetune-lora\\[torch\\]'"):
        decide("torch", machine=with_(torch=False))
    with pytest.raises(UserError, match="no training engine installed"):
        decide("auto", machine=with_(torch=False, mlx=False))
    with pytest.raises(UserError, match="--backend jax: choose one of auto, mlx, torch"):
        decide("jax", machine=LINUX_CPU)


def test_mlx_launch_ranks_need_mlx(monkeypatch):
    assert choose.mlx_only(0, False) == ""
    monkeypatch.setenv("MLX_RANK", "1")
    assert choose.mlx_only(0, False) == "mlx.launch"


def test_a_quantized_mlx_lm_base_is_recognised_without_loading(tmp_path):
    for name, config in (("q", {"model_type": "llama", "quantization": {"group_size": 64, "bits": 4}}),
                         ("f", {"model_type": "llama"})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    assert choose.quantized_base(str(tmp_path / "q")) and not choose.quantized_base(str(tmp_path / "f"))
    assert not choose.quantized_base("org/not-cached") and not choose.quantized_base(str(tmp_path / "missing"))


def test_the_backend_line_of_an_auto_run_names_the_engine_and_why(tmp_path, capsys):
    """End to end on this machine (x86-64 Linux, both engines installed): auto trains with torch,
    and with MLX as soon as the recipe asks for QLoRA."""
    from cli_run import run_cli

    if not choose.this_machine().linux_x86:
        pytest.fail("this test describes the project's x86-64 Linux CI machine")
    code, out, err = run_cli(capsys, "train", "start", "tiny", "--iters", "1", "--batch-size", "2", "--eval-every", "0",
                             "--output", str(tmp_path / "a"))
    assert code == 0, err
    assert "torch" in out.splitlines()[0] and "auto: x86-64 Linux CPU" in out.splitlines()[0]
    code, out, err = run_cli(capsys, "train", "start", "tiny", "--iters", "1", "--batch-size", "2", "--eval-every", "0",
                             "--quantize-bits", "4", "--output", str(tmp_path / "b"))
    assert code == 0, err
    assert "auto: QLoRA (--quantize-bits) needs the MLX engine" in out
