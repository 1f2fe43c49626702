"""`ft fuse` and `ft adapters` where `import mlx` fails: the same files as with MLX, byte for byte.

One interpreter with MLX hidden (tests/no_mlx.py) runs every command; this process, with MLX,
runs the same commands (`ft fuse --backend mlx`) and compares. The NumPy pieces they rest on
(affine quantize and dequantize, bfloat16 rounding, safetensors files) are compared with MLX's own.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from lora_models import (
    build_hf,
    make_tokenizer,
    one_line_error,
    ours,
    random_adapter,
    run_cli,
    write_model,
)
from mlx.utils import tree_flatten
from no_mlx import BLOCK_MLX, BLOCK_TORCH

from finetune.core import affine, dtypes
from finetune.files import tensorfile

RUN_ALL = BLOCK_MLX + (
    "import contextlib, io, json, sys\n"
    "from finetune.cli import main\n"
    "done = []\n"
    "for args in json.loads(sys.argv[1]):\n"
    "    out, err = io.StringIO(), io.StringIO()\n"
    "    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):\n"
    "        code = main(args)\n"
    "    done.append({'code': code, 'stdout': out.getvalue(), 'stderr': err.getvalue()})\n"
    "done.append(sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm')))\n"
    "print(json.dumps(done))\n"
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Bases (llama and gpt2 float32, a bfloat16 llama-tied, an mlx-lm 4-bit llama-tied), an adapter
    for each, a bfloat16 copy of one adapter; then every command run once without MLX."""
    root = tmp_path_factory.mktemp("nomlx")
    tok, vocab = make_tokenizer(root / "tok")
    bases = {
        "llama": write_model(build_hf("llama", vocab), root / "llama", tok),
        "gpt2": write_model(build_hf("gpt2", vocab), root / "gpt2", tok),
        "bf16": write_model(build_hf("llama-tied", vocab, seed=2).to(torch.bfloat16), root / "bf16", tok),
    }
    bases["q4"] = _quantized(bases["bf16"], root / "q4", tok)
    bases["mxfp4"] = _quantized(bases["bf16"], root / "mxfp4", tok, mode="mxfp4")
    adapter = {name: random_adapter(d, root / f"{name}-adapter") for name, d in bases.items() if name in ("llama", "gpt2", "bf16")}
    adapter["q4"] = adapter["mxfp4"] = adapter["bf16"]
    adapter["half"] = _bf16_copy(adapter["llama"], root / "half-adapter")
    adapter["on-load"] = _quantized_on_load(adapter["bf16"], root / "on-load-adapter")
    commands = _commands(bases, adapter)
    script = [[str(a) for a in args] for args in commands.values()]
    done = subprocess.run([sys.executable, "-c", RUN_ALL, json.dumps(script)], capture_output=True, text=True,
                          cwd=root, check=True)
    *results, loaded = json.loads(done.stdout)
    return bases, adapter, dict(zip(commands, results, strict=True)), loaded, root


def _quantized(source: Path, d: Path, tok: Path, mode: str = "affine") -> Path:
    """mlx-lm's 4-bit layout (packed uint32 weight, bfloat16 scales and biases) of `source`."""
    model = ours(source)
    nn.quantize(model, group_size=32, bits=4, mode=mode)
    d.mkdir()
    tensors = {k: v.astype(mx.bfloat16) if v.dtype == mx.float32 else v for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(d / "model.safetensors"), tensors, metadata={"format": "mlx"})
    config = json.loads((source / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "quantization": {"group_size": 32, "bits": 4, "mode": mode}}))
    for f in tok.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    return d


def _quantized_on_load(adapter: Path, out: Path) -> Path:
    """The adapter as if trained on its float base quantized on load (QLoRA, 4-bit, group 64)."""
    out.mkdir()
    (out / "adapters.safetensors").write_bytes((adapter / "adapters.safetensors").read_bytes())
    config = json.loads((adapter / "adapter_config.json").read_text())
    record = {"group_size": 64, "bits": 4, "mode": "affine", "quantized_on_load": True}
    (out / "adapter_config.json").write_text(json.dumps({**config, "base_quantization": record}))
    return out


def _bf16_copy(adapter: Path, out: Path) -> Path:
    out.mkdir()
    tensors = mx.load(str(adapter / "adapters.safetensors"))
    mx.save_safetensors(str(out / "adapters.safetensors"), {k: v.astype(mx.bfloat16) for k, v in tensors.items()})
    (out / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())
    return out


def _commands(bases: dict[str, Path], adapter: dict[str, Path]) -> dict[str, list]:
    """Each command's arguments; outputs go under a `nomlx` folder of the working directory."""
    fuse = {f"fuse-{n}": ["fuse", bases[n], "--adapter", adapter[n], "--output", f"nomlx/fuse-{n}", "--backend", "auto"]
            for n in ("llama", "gpt2", "bf16")}
    return fuse | {
        "fuse-q4": ["fuse", bases["q4"], "--adapter", adapter["q4"], "--output", "nomlx/fuse-q4", "--backend", "auto"],
        "fuse-mxfp4": ["fuse", bases["mxfp4"], "--adapter", adapter["mxfp4"], "--output", "nomlx/fuse-mxfp4"],
        "fuse-on-load": ["fuse", bases["bf16"], "--adapter", adapter["on-load"], "--output", "nomlx/fuse-on-load",
                         "--backend", "auto"],
        "fuse-q4-dequantized": ["fuse", bases["q4"], "--adapter", adapter["q4"], "--output", "nomlx/fuse-q4-dequantized",
                                "--dequantize", "--backend", "auto"],
        "export-peft": ["adapters", "export", adapter["llama"], "--format", "peft", "--output", "nomlx/export-peft"],
        "export-half": ["adapters", "export", adapter["half"], "--format", "peft", "--output", "nomlx/export-half"],
        "import": ["adapters", "import", "nomlx/export-half", "--output", "nomlx/import"],
        "inspect": ["adapters", "inspect", "nomlx/export-half", "--model", bases["llama"], "--json"],
        "inspect-misfit": ["adapters", "inspect", adapter["gpt2"], "--model", bases["llama"]],
    }


def same_files(a: Path, b: Path) -> None:
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for f in a.iterdir():
        assert f.read_bytes() == (b / f.name).read_bytes(), f.name


def test_nothing_loads_mlx_and_every_command_answers(setup):
    _, _, results, loaded, _ = setup
    assert loaded == []
    for name, r in results.items():
        if name in ("inspect-misfit", "fuse-mxfp4"):
            assert r["code"] == 2 and one_line_error(r["stderr"]).startswith("ft: error: "), (name, r)
        else:
            assert r["code"] == 0, (name, r["stderr"])
    assert "not in this model's blocks" in results["inspect-misfit"]["stderr"]
    assert one_line_error(results["fuse-mxfp4"]["stderr"]).endswith(
        "mxfp4 quantization is (de)quantized with MLX only (affine with NumPy), and MLX is not installed here "
        "(pip install mlx (Apple silicon), 'mlx[cpu]' or 'mlx[cuda]' (Linux))")
    assert "bfloat16" in json.loads(results["inspect"]["stdout"])["weights"]


@pytest.mark.parametrize("name", ["llama", "gpt2", "bf16", "q4", "q4-dequantized", "on-load"])
def test_fuse_writes_the_same_bytes_with_and_without_mlx(tmp_path, capsys, setup, name):
    bases, adapter, results, _, root = setup
    assert "checked with torch" in results[f"fuse-{name}"]["stdout"]
    base = bases["bf16" if name == "on-load" else name.removesuffix("-dequantized")]
    extra = ["--dequantize"] if name.endswith("-dequantized") else []
    code, stdout, err = run_cli(capsys, "fuse", base, "--adapter", adapter[name.removesuffix("-dequantized")],
                                "--output", tmp_path / "o", "--backend", "mlx", *extra)
    assert code == 0, err
    assert "checked with mlx" in stdout
    same_files(root / "nomlx" / f"fuse-{name}", tmp_path / "o")
    # the two engines ran the same models: the adapter's effect on the logits agrees
    effects = [float(re.search(r"moves logits by up to ([-+.e0-9]+),", out).group(1))
               for out in (stdout, results[f"fuse-{name}"]["stdout"])]
    assert effects[0] > 1e-2 and effects[1] == pytest.approx(effects[0], rel=1e-3)
    written = json.loads((tmp_path / "o" / "config.json").read_text())
    assert written["dtype"] == ("float32" if name in ("llama", "gpt2") else "bfloat16")
    assert ("quantization" in written) == (name in ("q4", "on-load"))
    if name == "on-load":
        assert written["quantization"]["group_size"] == 64 and "quantized 4-bit affine, group size 64" in stdout


def test_an_mxfp4_base_fuses_with_mlx_into_mxfp4(tmp_path, capsys, setup):
    bases, adapter, _, _, _ = setup
    code, stdout, err = run_cli(capsys, "fuse", bases["mxfp4"], "--adapter", adapter["mxfp4"], "--output", tmp_path / "o")
    assert code == 0, err
    assert "quantized 4-bit mxfp4, group size 32" in stdout and "checked with mlx" in stdout
    assert json.loads((tmp_path / "o" / "config.json").read_text())["quantization"]["mode"] == "mxfp4"


def test_adapters_convert_the_same_bytes_with_and_without_mlx(tmp_path, capsys, setup):
    _, adapter, _, _, root = setup
    nomlx = root / "nomlx"
    for name, source in (("export-peft", adapter["llama"]), ("export-half", adapter["half"])):
        assert run_cli(capsys, "adapters", "export", source, "--format", "peft", "--output", tmp_path / name)[0] == 0
        same_files(nomlx / name, tmp_path / name)
    # bfloat16 factors keep their bits through PEFT and back
    ours_, peft, back = (mx.load(str(p)) for p in (adapter["half"] / "adapters.safetensors",
                                                   nomlx / "export-half" / "adapter_model.safetensors",
                                                   nomlx / "import" / "adapters.safetensors"))
    assert back.keys() == ours_.keys() and {v.dtype for v in peft.values()} == {mx.bfloat16}
    for k, v in ours_.items():
        assert mx.array_equal(back[k].view(mx.uint16), v.view(mx.uint16))
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert mx.array_equal(peft[name].view(mx.uint16), ours_["model.layers.0.self_attn.q_proj.lora_a"].T.view(mx.uint16))


# ---------------------------------------------------------------------------------------------
# the NumPy pieces against MLX's own


@pytest.mark.parametrize("scales", ["float32", "float16", "bfloat16"])
def test_numpy_affine_dequantize_equals_mx_dequantize(scales):
    for group_size in (32, 64, 128):
        for bits in (1, 2, 3, 4, 5, 6, 8):
            w = (3 * mx.random.normal((8, 256), key=mx.random.key(bits * group_size))).astype(getattr(mx, scales))
            packed, s, b = mx.quantize(w, group_size=group_size, bits=bits)
            want = np.array(mx.dequantize(packed, s, b, group_size=group_size, bits=bits).astype(mx.float32))
            s_np, b_np = (np.array(x.view(mx.uint16)).view(dtypes.BF16) if scales == "bfloat16" else np.array(x)
                          for x in (s, b))
            got = affine.dequantize(np.array(packed), s_np, b_np, group_size, bits)
            assert got.dtype == np.float32 and np.array_equal(got, want), (group_size, bits)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_numpy_affine_quantize_equals_mx_quantize_bit_for_bit(dtype):
    for group_size in (32, 64, 128):
        for bits in (2, 3, 4, 5, 6, 8):
            key = mx.random.key(bits * group_size)
            w = mx.concatenate([0.02 * mx.random.normal((4, 256), key=key), 3 * mx.random.normal((4, 256), key=key) + 0.5,
                                mx.zeros((1, 256)), mx.full((1, 256), -0.25)]).astype(getattr(mx, dtype))
            w_np = np.array(w.view(mx.uint16)).view(dtypes.BF16) if dtype == "bfloat16" else np.array(w)
            mine = affine.quantize(w_np, group_size, bits)
            theirs = mx.quantize(w, group_size=group_size, bits=bits)
            for a, b in zip(mine, theirs, strict=True):
                b_np = np.array(b.view(mx.uint16)) if b.dtype == mx.bfloat16 else np.array(b)
                assert dtypes.name(a) == str(b.dtype).removeprefix("mlx.core.")
                assert np.array_equal(np.ascontiguousarray(a).view(np.uint8), b_np.view(np.uint8)), (group_size, bits)


def test_bfloat16_and_float16_rounding_equal_mlx():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(50_000) * 10.0 ** rng.integers(-40, 38, 50_000)).astype(np.float32)
    x = np.concatenate([x, np.array([np.inf, -np.inf, 0.0, -0.0, 3.4e38, 1e-45, 65504.5, 7e4, 1 + 2**-8], np.float32)])
    for name in ("bfloat16", "float16"):
        mine = dtypes.cast(x, name).view(np.uint16)
        theirs = np.array(mx.array(x).astype(getattr(mx, name)).view(mx.uint16))
        assert np.array_equal(mine, theirs), name
        assert np.array_equal(dtypes.as_float32(dtypes.cast(x, name)), np.array(mx.array(x).astype(getattr(mx, name)).astype(mx.float32)))
    assert np.isnan(dtypes.as_float32(dtypes.cast(np.array([np.nan], np.float32), "bfloat16"))).all()


def test_safetensors_files_read_and_write_as_mlx_does(tmp_path):
    tensors = {"a": mx.random.normal((3, 5)).astype(mx.bfloat16), "b": mx.arange(6, dtype=mx.uint32).reshape(2, 3),
               "c": mx.random.normal((4,)).astype(mx.float16), "d": mx.zeros((0, 2))}
    mx.save_safetensors(str(tmp_path / "mlx.safetensors"), tensors, metadata={"format": "mlx"})
    read = tensorfile.read(tmp_path / "mlx.safetensors").unwrap()
    assert {k: (dtypes.name(v), v.shape) for k, v in read.items()} == {
        "a": ("bfloat16", (3, 5)), "b": ("uint32", (2, 3)), "c": ("float16", (4,)), "d": ("float32", (0, 2))}
    tensorfile.write(tmp_path / "ours.safetensors", {**read, "t": read["a"].T}, {"format": "pt"})
    back = mx.load(str(tmp_path / "ours.safetensors"))
    for k in ("a", "b", "c", "d"):
        assert back[k].dtype == tensors[k].dtype and mx.array_equal(back[k], tensors[k])
    assert mx.array_equal(back["t"], tensors["a"].T)
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "ours.safetensors").read_bytes()[:-3])
    assert "truncated" in tensorfile.read(tmp_path / "cut.safetensors").failure()


# ---------------------------------------------------------------------------------------------
# neither engine: NumPy alone fuses, and checks the fused layers' weights

HIDE_TORCH = BLOCK_MLX + BLOCK_TORCH


def test_with_neither_engine_fuse_checks_the_weights_and_writes_the_same_bytes(tmp_path, setup):
    bases, adapter, _, _, root = setup
    vanishing = random_adapter(bases["bf16"], tmp_path / "vanishing", b_std=1e-6)
    script = [["fuse", str(bases["bf16"]), "--adapter", str(adapter["bf16"]), "--output", "fused"],
              ["fuse", str(bases["bf16"]), "--adapter", str(vanishing), "--output", "vanished"],
              ["fuse", str(bases["q4"]), "--adapter", str(adapter["q4"]), "--output", "q4"],
              ["fuse", str(bases["llama"]), "--adapter", str(adapter["llama"]), "--output", "o", "--backend", "mlx"],
              ["fuse", str(bases["llama"]), "--adapter", str(adapter["llama"]), "--output", "o", "--backend", "torch"]]
    env = {k: v for k, v in os.environ.items() if k != "FT_BACKEND"}
    done = subprocess.run([sys.executable, "-c", HIDE_TORCH + RUN_ALL.removeprefix(BLOCK_MLX),
                           json.dumps(script)], capture_output=True, text=True, cwd=tmp_path, env=env, check=True)
    fused, vanished, q4, mlx, torch_, loaded = json.loads(done.stdout)
    assert loaded == []
    assert fused["code"] == 0, fused["stderr"]
    assert "check on the weights of 14 fused layers" in fused["stdout"] and "checked with NumPy" in fused["stdout"]
    same_files(tmp_path / "fused", root / "nomlx" / "fuse-bf16")
    assert q4["code"] == 0 and "check on the weights of 14 fused layers" in q4["stdout"], q4["stderr"]
    same_files(tmp_path / "q4", root / "nomlx" / "fuse-q4")
    assert vanished["code"] == 2 and "rounds away in bfloat16" in one_line_error(vanished["stderr"])
    assert not (tmp_path / "vanished").exists()
    assert one_line_error(mlx["stderr"]).startswith("ft: error: --backend mlx: MLX is not installed here")
    assert one_line_error(torch_["stderr"]).startswith("ft: error: --backend torch: torch and peft are not installed")


def test_fuse_all_is_lora_fuse_and_leaves_its_inputs_alone():
    from finetune.core import fusing, lora

    rng = np.random.default_rng(0)
    w = rng.integers(-8, 8, (6, 5)).astype(np.float32)  # small integers: every sum is exact
    a, b = rng.integers(-4, 4, (5, 2)).astype(np.float32), rng.integers(-4, 4, (2, 6)).astype(np.float32)
    weights = {"x.weight": w, "y.weight": w.copy()}
    before = {k: v.copy() for k, v in weights.items()}
    fused = fusing.fuse_all(weights, {"x": (a, b)}, 0.5)
    assert np.array_equal(fused["x.weight"], lora.fuse(w, a, b, 0.5)) and fused["y.weight"] is weights["y.weight"]
    assert np.array_equal(fused["x.weight"], w + 0.5 * (a @ b).T)
    assert all(np.array_equal(weights[k], before[k]) for k in weights)
