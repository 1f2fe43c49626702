"""The whole `ft` command line where `import mlx` fails, on the bundled `tiny` model.

One fresh interpreter with MLX hidden (tests/no_mlx.py) runs every command in turn through
`finetune.cli.main`, recording each one's exit code, stdout and stderr; the assertions read that
record. The interpreter starts with an empty FINETUNE_HOME, so it builds `tiny` itself (NumPy
draws the weights; its HF directory is plain transformers).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from no_mlx import BLOCK_MLX

DRIVER = BLOCK_MLX + """
import contextlib, io, json
from finetune.cli import main

record = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    record.append({"argv": argv, "code": code, "out": out.getvalue(), "err": err.getvalue()})
record.append({"mlx imported": any(m == "mlx" or m.startswith("mlx.") for m in sys.modules)})
print(json.dumps(record))
"""

SUBCOMMANDS = (
    ["train", "quick"], ["train", "start"], ["train", "validate"], ["train", "recipe"], ["train", "list-data"],
    ["train", "plot"], ["generate"], ["models", "list"], ["models", "info"], ["fuse"],
    ["adapters", "export"], ["adapters", "import"], ["adapters", "inspect"],
)


def rows(n: int, offset: int = 0) -> str:
    return "".join(json.dumps({"prompt": f"Q: {i} plus {i}?\nA: ", "completion": str(2 * i)}) + "\n"
                   for i in range(offset, offset + n))


@pytest.fixture(scope="module")
def record(tmp_path_factory) -> dict[str, dict]:
    """`ft ...` -> {code, out, err}, every command run once, in one interpreter without MLX."""
    tmp = tmp_path_factory.mktemp("no-mlx")
    data = tmp / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(rows(8))
    (data / "valid.jsonl").write_text(rows(2, offset=8))
    small = ["--iters", "2", "--batch-size", "2", "--max-seq-length", "32", "--val-batches", "1",
             "--eval-every", "0", "--report-every", "1", "--save-every", "0"]
    t = str(tmp)
    commands = [
        ["--help"], *([*c, "--help"] for c in SUBCOMMANDS),
        ["models", "list"], ["models", "info", "tiny", "--load"],
        ["train", "list-data", str(data)],
        ["train", "validate", str(data), "--model", "tiny"],
        ["train", "recipe", f"{t}/recipe.toml", "--model", "tiny", "--data", str(data), *small],
        ["train", "validate", f"{t}/recipe.toml"],
        ["train", "quick", "tiny", str(data), *small, "--output", f"{t}/quick"],
        ["train", "start", "--recipe", f"{t}/recipe.toml", "--output", f"{t}/start"],
        ["generate", "tiny", "--adapter", f"{t}/start", "--prompt", "Q: 3 plus 3?\nA: ", "--max-tokens", "4"],
        ["generate", "tiny", "--messages", '[{"role": "user", "content": "hi"}]', "--temp", "0.7", "--top-p", "0.9",
         "--seed", "1", "--max-tokens", "4", "-v"],
        ["train", "plot", f"{t}/quick", f"{t}/start", "--output", f"{t}/loss.png"],
        ["adapters", "inspect", f"{t}/start"],
        ["adapters", "export", f"{t}/start", "--format", "peft", "--output", f"{t}/peft"],
        ["adapters", "import", f"{t}/peft", "--output", f"{t}/imported"],
        ["fuse", "tiny", "--adapter", f"{t}/start", "--output", f"{t}/fused"],
        ["generate", f"{t}/fused", "--prompt", "Q: 3 plus 3?\nA: ", "--max-tokens", "4"],
        ["train", "start", "tiny", str(data), "--backend", "mlx", "--output", f"{t}/refused"],
    ]
    env = {k: v for k, v in os.environ.items() if k != "FT_BACKEND"}  # the suite pins mlx; here: auto
    env["FINETUNE_HOME"] = str(tmp / "home")  # nothing built: `tiny` is made without MLX
    done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(commands)], capture_output=True, text=True,
                          env=env, cwd=tmp, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    *results, last = json.loads(done.stdout)
    assert last == {"mlx imported": False}
    return {" ".join(r["argv"]).replace(t, "TMP"): r for r in results}


def test_every_command_exits_0_without_a_traceback(record):
    for command, r in record.items():
        assert "Traceback" not in r["err"] + r["out"], command
        if "--backend mlx" in command:
            assert r["code"] == 2, command
            assert r["err"].strip().splitlines() == [
                "ft: error: --backend mlx: MLX is not installed here; pip install mlx (Apple silicon), 'mlx[cpu]' or "
                "'mlx[cuda]' (Linux), or use --backend torch"]
        else:
            assert r["code"] == 0, (command, r["err"][-2000:])
    assert len(record) == 1 + len(SUBCOMMANDS) + 17


def test_help_lists_every_command(record):
    assert all(name in record["--help"]["out"] for name in ("train", "generate", "models", "fuse", "adapters"))
    for sub in SUBCOMMANDS:
        assert "Usage:" in record[" ".join([*sub, "--help"])]["out"], sub
    assert "--backend" in record["generate --help"]["out"] and "--backend" in record["models info --help"]["out"]


def test_models_and_validate_describe_the_torch_engine(record):
    listed = record["models list"]["out"]
    assert "tiny" in listed and "llama" in listed
    info = record["models info tiny --load"]
    assert "backend: torch" in info["err"] and "MLX is not installed" in info["err"]
    assert "loaded with transformers in" in info["out"] and "not fitted to torch" in info["out"]
    for command in ("train validate TMP/data --model tiny", "train validate TMP/recipe.toml"):
        r = record[command]
        assert "Memory estimate for the torch engine" in r["out"] and "OK: ready to train." in r["out"], r["out"]
    assert "data" in record["train list-data TMP/data"]["out"]


def test_training_picks_torch_and_writes_a_run(record, tmp_path_factory):
    for command in ("train quick tiny TMP/data", "train start --recipe TMP/recipe.toml"):
        r = next(v for k, v in record.items() if k.startswith(command))
        assert "backend: torch" in r["out"] and "(auto: MLX is not installed)" in r["out"], r["out"]
        assert "Adapters in " in r["out"]
    quick = next(v for k, v in record.items() if k.startswith("train quick tiny"))
    assert "[Before training] model:" in quick["out"] and "[After training] model:" in quick["out"]  # torch samples
    plot = record["train plot TMP/quick TMP/start --output TMP/loss.png"]
    assert "Wrote" in plot["out"] and "quick" in plot["out"] and "start" in plot["out"]


def test_generate_adapters_and_fuse_work_on_the_run(record):
    with_adapter = next(v for k, v in record.items() if k.startswith("generate tiny --adapter"))
    fused = next(v for k, v in record.items() if k.startswith("generate TMP/fused"))
    for r in (with_adapter, fused):
        assert "backend: torch" in r["err"] and "tokens/s (prompt: " in r["err"]
    assert with_adapter["out"] == fused["out"]  # the fused base says what base + adapter says (greedy)
    assert "parameters" in record["adapters inspect TMP/start"]["out"]
    assert "Wrote PEFT adapter" in record["adapters export TMP/start --format peft --output TMP/peft"]["out"]
    assert "Fused" in record["fuse tiny --adapter TMP/start --output TMP/fused"]["out"]
    chat = next(v for k, v in record.items() if k.startswith("generate tiny --messages"))
    assert "stop ids" in chat["err"] and chat["err"].strip().endswith("tokens/s)")


def test_validate_with_torch_estimates_at_the_torch_dtype(capsys, tmp_path):
    """In-process, MLX installed: `--backend torch` changes the estimate's dtype, not the recipe."""
    from cli_run import run_cli

    from finetune.engines.torch import device

    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(rows(8))
    reports = {}
    for engine in ("mlx", "torch"):
        code, out, err = run_cli(capsys, "train", "validate", data, "--model", "tiny", "--json", "--backend", engine)
        assert code == 0, err
        assert ("backend: torch" in err) == (engine == "torch")
        reports[engine] = json.loads(out)
    assert reports["mlx"]["recipe"] == reports["torch"]["recipe"]
    mlx, torch = reports["mlx"]["estimate"], reports["torch"]["estimate"]
    assert torch["weights_gb"] == mlx["weights_gb"] / (2 if device.resolve_dtype("auto", device.pick("cpu")).itemsize == 2 else 1)
    assert torch["lora_gb"] == mlx["lora_gb"]  # float32 LoRA and AdamW in both
