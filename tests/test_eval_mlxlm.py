"""`ft eval` on adapters that `mlx_lm lora` itself trained: rows rendered as mlx-lm rendered them.

mlx-lm renders a prompt/completion row as a user and an assistant turn through the tokenizer's chat
template, tokenized as the template writes it (no BOS added: our chatml tokenizer adds one, the
template does not), and trains every token, or from the prompt's end with --mask-prompt. The
checks compare with mlx-lm's own dataset code and its own evaluation loss.
"""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from cli_run import error_line, run_cli
from test_eval import ROWS, small, write_rows  # noqa: F401  (small: the fixture)

import finetune
from finetune.files.tokenizer import load_tokenizer
from finetune.shell.evaluation import rows

TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def _module_home(module_home):
    """conftest's module_home for every fixture of this module."""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_rows(tmp_path_factory.mktemp("data") / "memorise", ROWS)


def _mlx_lm_lora(model: Path, data: Path, out: Path, mask_prompt: bool) -> Path:
    """`mlx_lm lora --train` (its own `run`, in this process) for a few steps at a high rate."""
    from mlx_lm import lora

    args = {**lora.CONFIG_DEFAULTS, "model": str(model), "train": True, "data": str(data), "iters": 4,
            "batch_size": 3, "num_layers": 2, "learning_rate": 3e-3, "steps_per_report": 4, "steps_per_eval": 100,
            "val_batches": 1, "save_every": 100, "adapter_path": str(out), "mask_prompt": mask_prompt}
    lora.run(types.SimpleNamespace(**args))
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapters.safetensors"]
    return out


@pytest.fixture(scope="module")
def mlx_runs(small, data, tmp_path_factory) -> dict[bool, Path]:  # noqa: F811
    """mlx-lm adapters by --mask-prompt."""
    root = tmp_path_factory.mktemp("mlx-lm")
    return {mask: _mlx_lm_lora(small, data, root / ("masked" if mask else "every"), mask) for mask in (False, True)}


@pytest.mark.parametrize("mask", [False, True])
def test_rows_are_the_token_ids_and_loss_mask_mlx_lm_trained_on(small, data, mlx_runs, mask):  # noqa: F811
    from mlx_lm.tuner.datasets import create_dataset
    from mlx_lm.utils import load_tokenizer as mlx_lm_tokenizer

    test = data / "test.jsonl"
    rendering = rows.rendering_for(str(test), str(mlx_runs[mask]))
    assert rendering.mlx_lm == rows.MlxLm(mask_prompt=mask) and rendering.note.startswith("mlx-lm: ")
    tokenizer = load_tokenizer(small)
    cases = rows.read(rendering.recipe, test, tokenizer, mlx_lm=rendering.mlx_lm).unwrap().cases
    theirs = create_dataset(ROWS, mlx_lm_tokenizer(small), types.SimpleNamespace(mask_prompt=mask))
    assert len(cases) == len(ROWS)
    for case, row in zip(cases, ROWS, strict=True):
        ids, offset = theirs.process(row)
        assert case.tokens.ids == tuple(ids) and ids[0] != tokenizer.bos_token_id
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}],
                                               add_generation_prompt=True, return_dict=False)
        assert case.prompt == tuple(prompt) and case.reference == row["completion"]
        assert case.tokens.mask == tuple(int(k >= max(offset, 1)) for k in range(len(ids)))
        assert offset == (len(prompt) if mask else 0)
    defaults = rows.rendering_for(str(test), None)  # the same rows rendered FineTune's way differ
    plain = rows.read(defaults.recipe, test, tokenizer).unwrap().cases
    assert defaults.mlx_lm is None and all(p.tokens.ids != c.tokens.ids for p, c in zip(plain, cases, strict=True))


def _own_tokens_loss(model, batch, lengths):
    """mlx-lm's `default_loss` over each row's own tokens: its `steps <= length` also scores one
    target past a row's end (a padding id), which is no token of the row."""
    logits = model(batch[:, :-1])
    steps = mx.arange(1, batch.shape[1])
    mask = mx.logical_and(steps >= lengths[:, 0:1], steps < lengths[:, 1:])
    ce = nn.losses.cross_entropy(logits, batch[:, 1:]) * mask
    return ce.astype(mx.float32).sum() / mask.sum(), mask.sum()


@pytest.mark.parametrize("mask", [False, True])
def test_ft_eval_loss_of_an_mlx_lm_adapter_is_mlx_lms_own(small, data, mlx_runs, mask, capsys):  # noqa: F811
    import mlx_lm
    from mlx_lm.tuner.datasets import CacheDataset, create_dataset
    from mlx_lm.tuner.trainer import evaluate

    code, out, err = run_cli(capsys, "eval", small, data, "--adapter", mlx_runs[mask], "--metric", "loss", "--json")
    assert code == 0, err
    base, adapted = json.loads(out)["results"]
    assert (base["name"], adapted["name"]) == ("base", str(mlx_runs[mask]))
    assert base["rendering"] == adapted["rendering"] == rows.rendering_for("x", str(mlx_runs[mask])).note
    model, tokenizer = mlx_lm.load(str(small), adapter_path=str(mlx_runs[mask]))
    test = CacheDataset(create_dataset(ROWS, tokenizer, types.SimpleNamespace(mask_prompt=mask)))
    theirs = evaluate(model, test, batch_size=3, num_batches=-1, loss=_own_tokens_loss)
    assert adapted["loss"] == pytest.approx(theirs, rel=TOL)
    assert abs(base["loss"] - adapted["loss"]) > 0.05  # the adapter moved the loss mlx-lm trained


@pytest.fixture(scope="module")
def ft_run(small, data, tmp_path_factory) -> Path:  # noqa: F811
    return finetune.train(None, model=str(small), data=str(data), output=tmp_path_factory.mktemp("runs") / "ours",
                          iters=2, batch_size=3, eval_every=0, report_every=2).run_dir


def test_the_base_gets_a_row_per_rendering_its_adapters_were_trained_on(small, data, mlx_runs, ft_run, capsys):  # noqa: F811
    code, out, err = run_cli(capsys, "eval", small, data, "--adapter", ft_run, mlx_runs[False], "--metric", "loss",
                             "--json")
    assert code == 0, err
    result = json.loads(out)["results"]
    assert [r["name"] for r in result] == ["base (as ours)", "base (as every)", str(ft_run), str(mlx_runs[False])]
    assert [r["rendering"] for r in result[:2]] == [r["rendering"] for r in result[2:]]
    assert result[0]["rendering"] == "recipe.toml: template auto, supervise assistant"
    alone = finetune.evaluate(small, data, [mlx_runs[False]], metric="loss").results[0]
    assert alone.name == "base" and alone.loss == pytest.approx(result[1]["loss"], rel=1e-6)
    code, out, err = run_cli(capsys, "eval", small, data, "--adapter", ft_run, mlx_runs[False], "--metric", "loss")
    assert code == 0, err
    flat = " ".join(out.split())
    names = " ".join(" ".join(line.split("│")[1] for line in out.splitlines() if line.startswith("│")).split())
    assert names == "base (as ours) [1] base (as every) [2] ours [1] every [2]"
    assert "[1] rows rendered as in training: recipe.toml: template auto" in flat
    assert "[2] rows rendered as in training: mlx-lm: tokenizer chat" in flat
    code, out, err = run_cli(capsys, "eval", small, data, "--adapter", mlx_runs[True], "--metric", "loss")
    assert "Rows rendered as in training: mlx-lm: tokenizer chat template, loss from the prompt's end" in " ".join(out.split())


def test_finetune_adapter_files_without_recipe_render_with_defaults(ft_run, tmp_path):
    """FineTune's adapter_config.json (mlx-lm's adapter format) holds no training arguments."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("adapters.safetensors", "adapter_config.json"):
        shutil.copy(ft_run / name, bare / name)
    rendering = rows.rendering_for("d.jsonl", str(bare))
    assert rendering.mlx_lm is None and rendering.note == "FineTune defaults (no recipe.toml): template auto, supervise assistant"


def test_an_mlx_lm_adapter_needs_a_chat_template(small, data, mlx_runs, tmp_path, capsys):  # noqa: F811
    bare = shutil.copytree(small, tmp_path / "no-template")
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    assert not load_tokenizer(bare).chat_template
    code, _, err = run_cli(capsys, "eval", bare, data, "--adapter", mlx_runs[False], "--metric", "loss")
    assert code == 2
    assert error_line(err).endswith("test.jsonl:1: mlx-lm renders completions rows with the tokenizer's chat "
                                    "template, and this model's tokenizer has none")
