"""Loss curves and metrics.jsonl: the end-of-run text curve, `ft train plot` PNGs (decoded and
checked pixel by pixel for the run colours), bad input as one line, and metrics.jsonl appended
to during a run and cut back to the checkpoint on --resume."""

from __future__ import annotations

import io
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from cli_run import one_line_error, run_cli
from PIL import Image

from finetune.core.convert import mlx_to_hf
from finetune.engines.mlx.model import build
from finetune.shell import plot, recipes
from finetune.shell.training import run

ROOT = Path(__file__).parents[1]


def reports(steps, loss, val_every: int = 0) -> list[dict]:
    """Rows as `metrics.jsonl` holds them; val_loss on every `val_every`-th step, else None."""
    return [{"step": s, "train_loss": loss(s), "val_loss": loss(s) + 0.2 if val_every and s % val_every == 0 else None,
             "learning_rate": 1e-4} for s in steps]


def write_run(directory: Path, rows: list[dict]) -> Path:
    directory.mkdir(parents=True)
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


# ---------------------------------------------------------------------------------------------
# the text curve


def test_the_text_curve_puts_the_first_and_last_points_in_the_corners():
    rows = reports(range(10, 110, 10), lambda s: 5.0 - s / 25, val_every=50)  # 4.6 .. 1.0
    text = plot.text_curve(rows, width=40, height=10)
    lines = text.splitlines()
    assert lines[0] == "Loss by step: * train, o validation (# both)"
    grid = lines[1:11]
    assert grid[0].startswith("4.600 ┤*")  # highest loss, first step: top left
    assert grid[-1].startswith("1.000 ┤") and grid[-1].endswith("*")  # lowest, last step: bottom right
    assert len(grid[-1]) == len("1.000 ┤") + 40
    assert sum(line.count("*") + line.count("#") for line in grid) == 10  # one mark per report
    assert sum(line.count("o") for line in grid) == 2  # validation at steps 50 and 100
    assert lines[11] == "      └" + "─" * 40
    assert lines[12].split() == ["10", "100", "step"]
    assert "\x1b" not in text  # plain text: reads the same in a log file


def test_no_curve_from_one_report_or_from_non_finite_losses():
    assert plot.text_curve(reports([5], lambda s: 1.0)) == ""
    assert plot.text_curve(reports([5, 10], lambda s: float("nan"))) == ""
    flat = plot.text_curve(reports([5, 10], lambda s: 2.0), width=20, height=11).splitlines()
    assert [line[:7] for line in flat[1:12:5]] == ["2.100 ┤", "2.000 ┤", "1.900 ┤"]
    assert flat[6] == "2.000 ┤*" + " " * 18 + "*"  # both points on the middle row


# ---------------------------------------------------------------------------------------------
# the PNG


def test_the_figure_has_one_colour_per_run_train_solid_validation_dashed():
    a = reports(range(10, 60, 10), lambda s: 3.0 - s / 50, val_every=20)
    b = reports(range(10, 40, 10), lambda s: 2.0 - s / 100)
    fig = plot.figure({"a": a, "b": b})
    lines = fig.axes[0].get_lines()
    assert [ln.get_label() for ln in lines] == ["a train", "a validation", "b train"]
    assert [ln.get_color() for ln in lines] == [plot.COLOURS[0], plot.COLOURS[0], plot.COLOURS[1]]
    assert [ln.get_linestyle() for ln in lines] == ["-", "--", "-"]
    assert list(lines[0].get_xdata()) == [10, 20, 30, 40, 50]
    assert list(lines[0].get_ydata()) == [r["train_loss"] for r in a]
    assert list(lines[1].get_xdata()) == [20, 40] and list(lines[1].get_ydata()) == [a[1]["val_loss"], a[3]["val_loss"]]
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["a train", "a validation", "b train"]


def colour_pixels(png: bytes, hex_colour: str) -> int:
    rgb = np.array(Image.open(io.BytesIO(png)).convert("RGB"))
    want = [int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)]
    return int(np.all(rgb == want, axis=-1).sum())


def test_ft_train_plot_writes_a_png_with_each_runs_colour(tmp_path, capsys):
    write_run(tmp_path / "first", reports(range(5, 105, 5), lambda s: 4.0 / (1 + s / 20), val_every=20))
    write_run(tmp_path / "second", reports(range(5, 55, 5), lambda s: 3.0 / (1 + s / 10)))
    out = tmp_path / "loss.png"
    code, stdout, _ = run_cli(capsys, "train", "plot", tmp_path / "first", tmp_path / "second", "--output", out)
    assert code == 0 and "first, second" in stdout
    png = out.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert png[12:16] == b"IHDR"
    assert struct.unpack(">II", png[16:24]) == (800, 500)  # figsize 8x5 at 100 dpi
    image = Image.open(io.BytesIO(png))
    image.verify()  # CRCs and structure
    assert colour_pixels(png, plot.COLOURS[0]) > 300  # the lines and legend in run 1's colour
    assert colour_pixels(png, plot.COLOURS[1]) > 300
    assert colour_pixels(png, plot.COLOURS[2]) == 0  # no third run
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_runs_with_the_same_name_are_told_apart_by_path(tmp_path, capsys):
    write_run(tmp_path / "a" / "run", reports([1, 2], lambda s: 1.0 / s))
    write_run(tmp_path / "b" / "run", reports([1, 2], lambda s: 2.0 / s))
    names = plot.run_names([str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run"), "c"])
    assert names == [str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run"), "c"]


@pytest.mark.parametrize("case", ["missing", "file", "no-metrics", "empty", "bad-line", "no-loss"])
def test_bad_runs_are_one_line_and_exit_2(tmp_path, capsys, case):
    target = tmp_path / "run"
    if case == "file":
        target.write_text("x")
    elif case != "missing":
        target.mkdir()
    content = {"empty": "\n", "bad-line": '{"step": 1, "train_loss": 2.0}\n{"step": 2, "train_lo\n',
               "no-loss": '{"step": 1}\n'}
    if case in content:
        (target / "metrics.jsonl").write_text(content[case])
    out = tmp_path / "loss.png"
    code, _, err = run_cli(capsys, "train", "plot", target, "--output", out)
    assert code == 2
    line = one_line_error(err)
    assert str(target) in line
    expected = {"missing": "no such run directory", "file": "not a run directory", "no-metrics": "no metrics.jsonl",
                "empty": "no reports yet", "bad-line": "metrics.jsonl:2: not a JSON object",
                "no-loss": "metrics.jsonl:1: a report needs"}
    assert expected[case] in line
    assert not out.exists()


def test_no_run_or_a_non_png_output_is_one_line(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "plot", "--output", tmp_path / "x.png")
    assert code == 2 and "at least one run directory" in one_line_error(err)
    write_run(tmp_path / "r", reports([1, 2], lambda s: 1.0))
    code, _, err = run_cli(capsys, "train", "plot", tmp_path / "r", "--output", tmp_path / "x.jpg")
    assert code == 2 and "*.png" in one_line_error(err)


def test_without_matplotlib_the_error_names_the_extra(tmp_path):
    write_run(tmp_path / "r", reports([1, 2], lambda s: 1.0))
    hide = "import sys; sys.modules['matplotlib'] = None; from finetune.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", hide, "train", "plot", str(tmp_path / "r"), "--output",
                           str(tmp_path / "x.png")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "finetune-lora[plot]" in one_line_error(proc.stderr)
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------------------------------------
# metrics.jsonl during a run


@pytest.fixture(scope="module")
def llama(tmp_path_factory, model_dir) -> Path:
    """The conftest tiny Llama with random weights (MLX init from a fixed seed) in HF layout."""
    out = tmp_path_factory.mktemp("weighted") / "llama"
    shutil.copytree(model_dir, out)
    config = json.loads((out / "config.json").read_text())
    mx.random.seed(0)
    params = dict(_flat(build(config).parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), mlx_to_hf("llama", config, params), metadata={"format": "pt"})
    return out


def _flat(tree):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data") / "sql"
    d.mkdir()
    rows = [{"prompt": f"SELECT name FROM users WHERE id = {i}\nQ: ", "completion": f"hello world {i}"} for i in range(16)]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    return d


def recipe_file(path: Path) -> Path:
    path.write_text("[train]\nreport_every = 1\neval_every = 3\nsave_every = 2\nkeep_checkpoints = 5\n"
                    "batch_size = 4\nlearning_rate = 0.01\n")
    return path


def test_metrics_are_appended_line_by_line_and_the_run_ends_with_its_curve(tmp_path, llama, data):
    r = recipes.load(recipe_file(tmp_path / "r.toml"),
                     dict(model=str(llama), data=str(data), iters=6, output=str(tmp_path / "run"))).unwrap()
    run_dir = tmp_path / "run"
    seen: list[tuple[int, str]] = []  # (inode, content) of metrics.jsonl at each report
    logged: list[str] = []

    def log(line: str) -> None:
        logged.append(line)
        if line.startswith("Iter") and "Train loss" in line:
            path = run_dir / "metrics.jsonl"
            seen.append((path.stat().st_ino, path.read_text()))

    prepared = run.prepare_run(r, log).unwrap()
    run.fit(prepared, run_dir, False, log).unwrap()
    assert len(seen) == 6
    assert len({inode for inode, _ in seen}) == 1  # the same file throughout: appended, never replaced
    for i, (_, text) in enumerate(seen, 1):
        assert [json.loads(line)["step"] for line in text.splitlines()] == list(range(1, i + 1))
        assert text == seen[-1][1][: len(text)]  # each state is a prefix of the next
    curve = next(line for line in logged if line.startswith("Loss by step"))
    assert "* train" in curve and "o validation" in curve and curve.rstrip().endswith("step")


def test_resume_cuts_metrics_back_to_the_checkpoint_then_appends(tmp_path, capsys, llama, data):
    recipe, out = recipe_file(tmp_path / "r.toml"), tmp_path / "run"
    argv = ["train", "start", llama, data, "--recipe", recipe, "--iters", "6", "--output", out]
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    full = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in full] == [1, 2, 3, 4, 5, 6]
    # as if killed after reporting step 5 (mid-way through writing step 6's line), before checkpoint 6
    shutil.rmtree(out / "checkpoints" / "step-0000006")
    (out / "metrics.jsonl").write_text("\n".join(full[:5]) + "\n" + full[5][:20])
    code, stdout, err = run_cli(capsys, *argv, "--resume")
    assert code == 0, err
    assert "Resuming at step 4" in stdout
    after = (out / "metrics.jsonl").read_text().splitlines()
    assert after[:4] == full[:4]  # kept byte for byte
    rows = [json.loads(line) for line in after]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # 5 and 6 once each: trained again
    for old, new in zip(full[4:], rows[4:], strict=True):
        assert json.loads(old)["train_loss"] == pytest.approx(new["train_loss"], rel=1e-5)
    assert "Loss by step" in stdout
