"""One source of truth for settings: every recipe field is a flag of `ft train start/quick`, the
run's recipe.toml validates, `ft train start` stops on validate's errors before loading weights,
and `finetune.train`/`finetune.validate` do what the commands do.
"""

from __future__ import annotations

import inspect
import json
import re
import typing
from pathlib import Path

import msgspec
import pytest
from cli_run import error_line, one_line_error, run_cli

import finetune
from finetune.cli import train as cli_train
from finetune.core import flags
from finetune.core.config import DataConfig, LoRAConfig, ModelConfig, Recipe, TrainingConfig
from finetune.shell import recipes

ROOT = Path(__file__).parents[1]
FAST = ("--iters", "2", "--batch-size", "2", "--report-every", "1", "--eval-every", "0", "--val-batches", "1")


def _option_names(command) -> set[str]:
    """Every `--name` the command accepts, read off the signature cyclopts parses."""
    names = set()
    for p in inspect.signature(command).parameters.values():
        meta = [m for m in typing.get_args(p.annotation)[1:] if hasattr(m, "name")]
        given = [n for m in meta for n in (m.name or ())]
        names |= set(given) or {"--" + p.name.replace("_", "-")}
    return names


@pytest.mark.parametrize("command", [cli_train.start, cli_train.quick, cli_train.recipe])
def test_every_field_of_the_four_configs_is_a_flag(command):
    fields = {
        (section, f.name)
        for section, struct in (("model", ModelConfig), ("data", DataConfig), ("lora", LoRAConfig), ("train", TrainingConfig))
        for f in msgspec.structs.fields(struct)
    }
    by_path = {f.path: f for f in flags.FLAGS}
    assert fields <= set(by_path)
    options = _option_names(command)
    for path in fields:
        assert by_path[path].option in options, path
    # the spellings the issue and FineTune's specification name
    for spelled in ("--save-every", "--eval-every", "--grad-checkpoint", "--quantize-bits", "--warmup",
                    "--dropout", "--optimizer", "--schedule", "--weight-decay", "--grad-clip",
                    "--lora-keys", "--data", "--template", "--model"):
        assert spelled in options, spelled


def test_every_flag_has_the_fields_help():
    for flag in flags.FLAGS:
        assert flag.help and flag.help[0].isupper() and flag.help.endswith("."), flag
    assert "Rank of the adapters." in [f.help for f in flags.FLAGS]


def test_flags_set_the_recipe_paths_they_name():
    raw = flags.layer({"lora_keys": "self_attn.q_proj, self_attn.v_proj", "format": "mlx", "save_every": 7,
                       "grad_checkpoint": True, "quantize_bits": 4, "dropout": 0.1, "model": "m", "data": "d"})
    r = recipes.load(None, {"lora_keys": "self_attn.q_proj,self_attn.v_proj", "format": "mlx",
                            "save_every": 7, "grad_checkpoint": True, "quantize_bits": 4,
                            "dropout": 0.1}).unwrap()
    assert raw["lora"]["keys"] == ["self_attn.q_proj", "self_attn.v_proj"]
    assert (raw["model"]["path"], raw["data"]["path"]) == ("m", "d")
    assert r.lora.keys == ("self_attn.q_proj", "self_attn.v_proj")
    assert r.data.format == "mlx"  # mlx-lm's formats, each row's detected (tests/test_format_spellings.py)
    assert (r.train.save_every, r.train.grad_checkpoint, r.model.quantize_bits, r.lora.dropout) == (7, True, 4, 0.1)


def test_format_mlx_decodes_in_a_recipe_file_too(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text("[data]\nformat = 'mlx'\n")
    assert recipes.load(path).unwrap().data.format == "mlx"


def test_quick_takes_data_and_template_as_flags(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "train", "quick", "--data", "sql", "--template", "plain", *FAST,
                             "--lora-keys", "self_attn.q_proj,self_attn.v_proj", "--output", "q")
    assert code == 0, err
    saved = recipes.load(tmp_path / "q" / "recipe.toml").unwrap()
    assert (saved.data.path, saved.data.template, saved.train.iters) == ("sql", "plain", 2)
    assert saved.lora.keys == ("self_attn.q_proj", "self_attn.v_proj")
    config = json.loads((tmp_path / "q" / "adapter_config.json").read_text())
    assert sorted(config["lora_parameters"]["keys"]) == ["self_attn.q_proj", "self_attn.v_proj"]


def test_a_bad_flag_value_names_its_field(capsys):
    code, _, err = run_cli(capsys, "train", "start", "tiny", "sql", "--warmup", "-1")
    assert code == 2
    assert "$.train.warmup" in one_line_error(err)


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "recipes").iterdir()))
def test_the_recipe_of_a_run_of_each_bundled_recipe_validates(name, tmp_path, capsys):
    recipe = next((ROOT / "recipes").glob(f"{name}.*"))
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "start", "--recipe", recipe, "--model", "tiny", *FAST, "--output", run)
    assert code == 0, err
    saved = run / "recipe.toml"
    assert recipes.load(saved).unwrap().train.max_seq_length > 0  # resolved against the model
    code, out, err = run_cli(capsys, "train", "validate", saved, "--json")
    report = json.loads(out)
    assert code == 0, [f for f in report["findings"] if f["level"] == "error"]


def test_a_plain_start_resolves_the_sequence_length_against_the_model(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "start", "tiny", "sql", *FAST, "--output", run)
    assert code == 0, err
    saved = recipes.load(run / "recipe.toml").unwrap()
    context = json.loads(_tiny_config().read_text())
    assert saved.train.max_seq_length == min(2048, context["max_position_embeddings"])
    code, _, _ = run_cli(capsys, "train", "validate", run / "recipe.toml")
    assert code == 0


def _tiny_config() -> Path:
    from finetune.files.tiny import ensure_tiny

    return ensure_tiny() / "config.json"


def test_start_stops_on_validate_errors_with_the_same_message_before_loading(tmp_path, capsys):
    context = json.loads(_tiny_config().read_text())["max_position_embeddings"]
    too_long = str(context * 2)
    code, out, err = run_cli(capsys, "train", "validate", "sql", "--model", "tiny", "--max-seq-length", too_long, "--json")
    assert code == 2
    message = next(f["message"] for f in json.loads(out)["findings"] if f["level"] == "error")
    code, out, err = run_cli(capsys, "train", "start", "tiny", "sql", "--max-seq-length", too_long, "--output", tmp_path / "r")
    assert code == 2
    line = error_line(err)
    assert line == f"ft: error: $.train.max_seq_length: {message}"
    assert "Loading" not in out  # stopped before any weight loaded
    assert not (tmp_path / "r").exists()


def test_start_prints_validate_warnings(tmp_path, capsys):
    code, out, err = run_cli(capsys, "train", "start", "tiny", "sql", *FAST, "--max-seq-length", "32", "--output", tmp_path / "r")
    assert code == 0, err
    assert re.search(r"warning: \$\.train\.max_seq_length: train: \d+ rows .* truncated", out)


def test_recipe_command_writes_yaml_and_toml_that_load_back(tmp_path, capsys):
    for suffix in ("yaml", "toml"):
        out_file = tmp_path / f"r.{suffix}"
        code, _, err = run_cli(capsys, "train", "recipe", out_file, "--recipe", ROOT / "recipes" / "sql.toml",
                               "--lora-rank", "4", "--format", "mlx", "--lora-keys", "mlp.up_proj")
        assert code == 0, err
        r = recipes.load(out_file).unwrap()
        expected = recipes.load(ROOT / "recipes" / "sql.toml", {"lora_rank": 4, "format": "mlx", "lora_keys": "mlp.up_proj"}).unwrap()
        assert r == expected
    code, _, err = run_cli(capsys, "train", "recipe", tmp_path / "r.txt")
    assert code == 2 and "must end in .toml, .yaml or .yml" in one_line_error(err)


def test_api_recipe_of_refuses_unknown_settings_with_a_suggestion():
    with pytest.raises(finetune.UserError, match=r"'lora_rnak' is not a recipe setting \(did you mean 'lora_rank'"):
        finetune.recipe_of(None, lora_rnak=4)
    r = finetune.recipe_of(Recipe(), lora_rank=4, batch_size=2)
    assert (r.lora.rank, r.train.batch_size) == (4, 2)


def test_api_validate_returns_the_report():
    report = finetune.validate(None, model="tiny", data="sql", max_seq_length=4096)
    assert not report.ok
    assert any(f.field == "$.train.max_seq_length" for f in report.findings)
    assert finetune.validate(None, model="tiny", data="sql").ok


def test_api_errors_carry_the_one_line_message(tmp_path):
    with pytest.raises(finetune.UserError, match=r"no-such-set"):
        finetune.train(None, model="tiny", data=str(tmp_path / "no-such-set"), output=tmp_path / "r")


def test_readme_python_section_runs(tmp_path, monkeypatch):
    """The README's Python script (the block calling finetune.train) trains, evaluates and generates, as written."""
    text = (ROOT / "README.md").read_text()
    code = next(c for c in re.findall(r"```python\n(.*?)```", text, re.S) if "finetune.train(" in c)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md (Python)", "exec"), scope)
    run = scope["run"]
    assert isinstance(run, finetune.Run) and run.steps == 30
    assert (tmp_path / run.run_dir / "adapters.safetensors").is_file()
    assert [m["step"] for m in run.metrics][-1] == 30
    assert run.val_loss == run.metrics[-1]["val_loss"] and run.plan["batch_size"] == 4
    assert scope["test_loss"] > 0 and isinstance(scope["text"], str)
    # the loss the API reports is the trainer's on the same split
    again = finetune.evaluate(tmp_path / run.run_dir, split="test")
    assert abs(again - scope["test_loss"]) < 1e-6
