"""Recipe files: every shipped one decodes; errors name file, field and value; layers; save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
from returns.result import Failure, Success

from finetune.core import recipe as core_recipe
from finetune.core.config import Recipe
from finetune.shell import recipes

RECIPES = sorted((Path(__file__).parents[1] / "recipes").iterdir())


def write(tmp_path: Path, text: str, name: str = "r.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error(path: Path, flags: dict | None = None) -> str:
    result = recipes.load(path, flags)
    assert isinstance(result, Failure), result
    message = result.failure()
    assert "\n" not in message
    return message


def test_there_are_recipes():
    assert {p.name for p in RECIPES} >= {
        "quick.toml",
        "sql.toml",
        "chat.toml",
        "instruction.toml",
        "code.yaml",
    }


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_decodes(path):
    result = recipes.load(path)
    assert isinstance(result, Success), result
    assert result.unwrap().name == path.stem


def test_shipped_recipes_say_what_they_mean():
    quick = recipes.load(RECIPES[0].parent / "quick.toml").unwrap()
    assert (quick.model.path, quick.data.path, quick.data.template) == ("tiny", "sql", "plain")
    assert (quick.train.iters, quick.train.batch_size, quick.train.max_seq_length) == (200, 8, 256)
    chat = recipes.load(RECIPES[0].parent / "chat.toml").unwrap()
    assert (chat.lora.rank, chat.lora.alpha, chat.lora.scale) == (16, 32.0, 2.0)
    assert (chat.train.epochs, chat.train.iters) == (3, 0)
    assert chat.data.format == "chat" and chat.train.warmup == 20  # from the chat profile
    code = recipes.load(RECIPES[0].parent / "code.yaml").unwrap()
    assert code.data.supervise == "last-turn-only" and code.train.learning_rate == 5e-5
    instruction = recipes.load(RECIPES[0].parent / "instruction.toml").unwrap()
    assert instruction.lora.keys == ("self_attn.q_proj", "self_attn.v_proj")


# --- errors name the file, the field and the value ----------------------------------------------


def test_out_of_bounds_value(tmp_path):
    path = write(tmp_path, "[train]\nbatch_size = 0\n")
    assert error(path) == f"{path}: $.train.batch_size: expected int >= 1, got 0"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[train]\nmax_seq_length = 4\n", "$.train.max_seq_length: must be 0 (the model's context) or >= 8, got 4"),
        ("[lora]\nrank = 0\n", "$.lora.rank: expected int >= 1, got 0"),
        ("[lora]\ndropout = 1.0\n", "$.lora.dropout: expected float < 1.0, got 1.0"),
        ("[train]\nlearning_rate = 0.0\n", "$.train.learning_rate: expected float > 0.0, got 0.0"),
        (
            "name = 'has space'\n",
            "$.name: expected str matching regex '^[A-Za-z0-9_.-]+$', got 'has space'",
        ),
        ("[lora]\nkeys = ['q_proj', '']\n", "$.lora.keys[1]: expected str of length >= 1, got ''"),
        ("[model]\nquantize_bits = 3\n", "$.model.quantize_bits: "),
        ("[data]\nformat = 'csv'\n", "$.data.format: "),
        ("[train]\nbatch_size = 'four'\n", "$.train.batch_size: expected int, got str"),
        ("model = 'tiny'\n", "$.model: expected object, got str"),
    ],
)
def test_bad_values_name_their_path(tmp_path, text, expected):
    path = write(tmp_path, text)
    message = error(path)
    assert message.startswith(f"{path}: {expected}")


def test_bad_enum_value_is_quoted(tmp_path):
    message = error(write(tmp_path, "[data]\nformat = 'csv'\n"))
    assert "$.data.format" in message and "'csv'" in message


def test_unknown_field_suggests_the_close_name(tmp_path):
    path = write(tmp_path, "[train]\nbatchsize = 2\n")
    message = error(path)
    assert message.startswith(
        f"{path}: $.train.batchsize: unknown field (did you mean 'batch_size'? "
    )
    assert "expected one of: iters, epochs, batch_size" in message


def test_unknown_top_level_field_and_section(tmp_path):
    message = error(write(tmp_path, "modle = 'x'\n"))
    assert "$.modle: unknown field (did you mean 'model'?" in message
    message = error(write(tmp_path, "[trian]\niters = 3\n"))
    assert "$.trian: unknown field (did you mean 'train'?" in message


def test_unknown_field_without_anything_close(tmp_path):
    message = error(write(tmp_path, "[lora]\nzzzzzz = 1\n"))
    assert "$.lora.zzzzzz: unknown field (expected one of: rank, scale, alpha" in message
    assert "did you mean" not in message


def test_iters_and_epochs_together_are_an_error(tmp_path):
    path = write(tmp_path, "[train]\niters = 10\nepochs = 2\n")
    message = error(path)
    assert message.startswith(
        f"{path}: $.train: give iters or epochs, not both (iters=10, epochs=2)"
    )


def test_neither_iters_nor_epochs_is_an_error(tmp_path):
    message = error(write(tmp_path, "[train]\niters = 0\n"))
    assert "$.train: one of iters or epochs must be >= 1" in message


def test_epochs_alone_withdraws_the_default_iters(tmp_path):
    recipe = recipes.load(write(tmp_path, "[train]\nepochs = 2\n")).unwrap()
    assert (recipe.train.epochs, recipe.train.iters) == (2, 0)
    assert (
        recipes.load(write(tmp_path, "name = 'x'\n")).unwrap().train.iters == Recipe().train.iters
    )


def test_alpha_derives_scale(tmp_path):
    recipe = recipes.load(write(tmp_path, "[lora]\nalpha = 32.0\nrank = 16\n")).unwrap()
    assert (recipe.lora.alpha, recipe.lora.rank, recipe.lora.scale) == (32.0, 16, 2.0)
    # with the default rank of 8
    recipe = recipes.load(write(tmp_path, "[lora]\nalpha = 4\n")).unwrap()
    assert recipe.lora.scale == 0.5


def test_alpha_with_a_consistent_scale_is_fine(tmp_path):
    recipe = recipes.load(
        write(tmp_path, "[lora]\nalpha = 32.0\nrank = 16\nscale = 2.0\n")
    ).unwrap()
    assert recipe.lora.scale == 2.0


def test_alpha_with_an_inconsistent_scale_is_an_error(tmp_path):
    path = write(tmp_path, "[lora]\nalpha = 32.0\nrank = 16\nscale = 3.0\n")
    message = error(path)
    assert message.startswith(f"{path}: $.lora.scale: 3.0 disagrees with alpha/rank = 2.0")


def test_other_cross_field_rules(tmp_path):
    assert "$.lora.num_layers: must be -1 (all) or >= 1, got 0" in error(
        write(tmp_path, "[lora]\nnum_layers = 0\n")
    )
    assert "$.lora.keys: must name at least one" in error(write(tmp_path, "[lora]\nkeys = []\n"))
    assert "$.train.min_learning_rate: must not exceed learning_rate" in error(
        write(tmp_path, "[train]\nlearning_rate = 1e-4\nmin_learning_rate = 1e-3\n")
    )
    assert "$.train.val_batches: must be -1 (all) or >= 1" in error(
        write(tmp_path, "[train]\nval_batches = 0\n")
    )


# --- layers: profile < file < flags -------------------------------------------------------------


@pytest.mark.parametrize(
    ("profile", "expected"),
    [
        (
            "chat",
            {
                "format": "chat",
                "supervise": "assistant",
                "rank": 16,
                "lr": 1e-4,
                "len": 0,  # the model's context, resolved against the model
                "warmup": 20,
            },
        ),
        ("instruction", {"template": "alpaca", "rank": 8, "lr": 2e-4, "len": 0, "warmup": 10}),
        (
            "code",
            {"supervise": "last-turn-only", "rank": 16, "scale": 10.0, "lr": 5e-5, "len": 0},
        ),
    ],
)
def test_profiles_give_defaults(tmp_path, profile, expected):
    r = recipes.load(write(tmp_path, f"profile = '{profile}'\n")).unwrap()
    got = {
        "format": r.data.format,
        "template": r.data.template,
        "supervise": r.data.supervise,
        "rank": r.lora.rank,
        "scale": r.lora.scale,
        "lr": r.train.learning_rate,
        "len": r.train.max_seq_length,
        "warmup": r.train.warmup,
    }
    assert {k: got[k] for k in expected} == expected


def test_explicit_values_override_the_profile(tmp_path):
    text = "profile = 'code'\n[data]\nsupervise = 'all'\n[lora]\nrank = 4\n[train]\nlearning_rate = 3e-4\n"
    r = recipes.load(write(tmp_path, text)).unwrap()
    assert (r.data.supervise, r.lora.rank, r.train.learning_rate) == ("all", 4, 3e-4)
    assert (r.lora.scale, r.train.warmup) == (10.0, 20)  # the rest still from the profile


def test_alpha_in_the_file_wins_over_the_profile_scale(tmp_path):
    r = recipes.load(write(tmp_path, "profile = 'chat'\n[lora]\nalpha = 8.0\n")).unwrap()
    assert (r.lora.rank, r.lora.scale) == (16, 0.5)


def test_flags_override_the_file(tmp_path):
    path = write(tmp_path, "[train]\nbatch_size = 8\niters = 100\n[data]\npath = 'chat'\n")
    r = recipes.load(path, {"batch_size": 2}).unwrap()
    assert (r.train.batch_size, r.train.iters, r.data.path) == (2, 100, "chat")
    r = recipes.load(
        path, {"batch_size": None, "data": "sql", "lora_rank": 4, "model": "m"}
    ).unwrap()
    assert (r.train.batch_size, r.data.path, r.lora.rank, r.model.path) == (8, "sql", 4, "m")


def test_flag_epochs_withdraws_the_file_iters(tmp_path):
    r = recipes.load(write(tmp_path, "[train]\niters = 100\n"), {"epochs": 3}).unwrap()
    assert (r.train.epochs, r.train.iters) == (3, 0)
    r = recipes.load(write(tmp_path, "[train]\nepochs = 3\n"), {"iters": 50}).unwrap()
    assert (r.train.epochs, r.train.iters) == (0, 50)


def test_flag_alpha_withdraws_the_file_scale_and_back(tmp_path):
    r = recipes.load(
        write(tmp_path, "[lora]\nrank = 4\nscale = 3.0\n"), {"lora_alpha": 16.0}
    ).unwrap()
    assert (r.lora.alpha, r.lora.scale) == (16.0, 4.0)
    r = recipes.load(
        write(tmp_path, "[lora]\nrank = 4\nalpha = 16.0\n"), {"lora_scale": 1.5}
    ).unwrap()
    assert (r.lora.alpha, r.lora.scale) == (0.0, 1.5)


def test_flag_profile_applies_its_defaults(tmp_path):
    r = recipes.load(write(tmp_path, "[lora]\nrank = 2\n"), {"profile": "code"}).unwrap()
    assert (r.profile, r.data.supervise, r.lora.rank) == ("code", "last-turn-only", 2)


def test_a_bad_flag_value_is_blamed_on_the_command_line(tmp_path):
    message = error(write(tmp_path, "[train]\nbatch_size = 4\n"), {"batch_size": 0})
    assert message == "command line: $.train.batch_size: expected int >= 1, got 0"


def test_flags_alone(tmp_path):
    assert recipes.load(None, {"iters": 7}).unwrap().train.iters == 7
    assert recipes.load(None).unwrap() == Recipe()


# --- syntax errors and files --------------------------------------------------------------------


def test_toml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "name = 'x'\n\n[train\niters = 10\n")
    message = error(path)
    assert message.startswith(f"{path}: invalid TOML: ")
    assert "line 3" in message


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "name: x\ntrain:\n\titers: 10\n", name="r.yaml")
    message = error(path)
    assert message.startswith(f"{path}: invalid YAML: line 3: ")


def test_yaml_recipe_decodes_like_toml(tmp_path):
    yaml_path = write(
        tmp_path, "name: y\nlora:\n  rank: 4\n  keys: [q_proj]\ntrain:\n  epochs: 2\n", "r.yml"
    )
    toml_path = write(
        tmp_path, "name = 'y'\n[lora]\nrank = 4\nkeys = ['q_proj']\n[train]\nepochs = 2\n"
    )
    assert recipes.load(yaml_path).unwrap() == recipes.load(toml_path).unwrap()


def test_yaml_that_is_not_a_table(tmp_path):
    message = error(write(tmp_path, "- a\n- b\n", "r.yaml"))
    assert "a recipe must be a table of settings, got list" in message
    assert recipes.load(write(tmp_path, "", "empty.yaml")).unwrap() == Recipe()


def test_yaml_bad_value_names_file_and_field(tmp_path):
    path = write(tmp_path, "train:\n  batch_size: -1\n", "r.yaml")
    assert error(path) == f"{path}: $.train.batch_size: expected int >= 1, got -1"


def test_missing_file_and_wrong_suffix(tmp_path):
    assert error(tmp_path / "nope.toml") == f"{tmp_path / 'nope.toml'}: no such recipe file"
    message = error(write(tmp_path, "name = 'x'\n", "r.json"))
    assert message == f"{tmp_path / 'r.json'}: a recipe must be .toml, .yaml or .yml"


def test_non_utf8_recipe(tmp_path):
    path = tmp_path / "r.toml"
    path.write_bytes(b"name = '\xff'\n")
    assert error(path).startswith(f"{path}: cannot read")


# --- save ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_saved_recipe_loads_back_equal(tmp_path, path):
    recipe = recipes.load(path).unwrap()
    out = recipes.save(recipe, tmp_path / "run" / "recipe.toml")
    assert out == tmp_path / "run" / "recipe.toml"
    assert recipes.load(out) == Success(recipe)


@pytest.mark.parametrize(
    "flags",
    [
        {"lora_rank": 8},
        {"lora_alpha": 64.0},
        {"lora_scale": 1.0},
        {"iters": 5},
        {"epochs": 1},
        {"batch_size": 1},
    ],
    ids=lambda f: next(iter(f)),
)
def test_flags_over_a_saved_recipe_act_as_over_the_original(tmp_path, flags):
    """A run's recipe.toml is the resolved recipe: re-using it with a flag gives what the original
    recipe gives with that flag (chat.toml sets alpha = 32 and rank = 16)."""
    original = RECIPES[0].parent / "chat.toml"
    saved = recipes.save(recipes.load(original).unwrap(), tmp_path / "recipe.toml")
    expected = recipes.load(original, flags)
    assert isinstance(expected, Success), expected
    assert recipes.load(saved, flags) == expected


def test_save_round_trips_awkward_strings_and_floats(tmp_path):
    raw = {
        "name": "a.b-c_1",
        "output": 'runs/"quoted" \\ back\tslash\nnew line é 日本',
        "data": {
            "template": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
        },
        "lora": {"alpha": 10.0, "rank": 3},
        "train": {"learning_rate": 3.0000000000000004e-05, "epochs": 1},
    }
    recipe = core_recipe.resolve([("r", raw)]).unwrap()
    assert recipe.lora.scale == 10.0 / 3
    out = recipes.save(recipe, tmp_path / "recipe.toml")
    assert recipes.load(out) == Success(recipe)


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    recipe = recipes.load(RECIPES[0].parent / "chat.toml").unwrap()
    target = tmp_path / "recipe.toml"
    target.write_text("old contents\n")
    recipes.save(recipe, target)
    recipes.save(recipe, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.toml"]
    assert recipes.load(target) == Success(recipe)


def test_save_failure_leaves_the_old_file_and_no_temp_files(tmp_path):
    target = tmp_path / "recipe.toml"
    target.write_text("name = 'old'\n")
    bad = Recipe(output="x\ud800")  # a lone surrogate cannot be written as TOML
    with pytest.raises(ValueError):
        recipes.save(bad, target)
    assert target.read_text() == "name = 'old'\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.toml"]


def test_to_builtins_gives_plain_lists():
    """Documented: 'the recipe as plain tables (tuples become lists)'."""
    table = core_recipe.to_builtins(Recipe())
    assert table["lora"]["keys"] == ["all-linear"]
    assert type(table["lora"]["keys"]) is list


def test_a_yaml_recipe_reads_back_as_written_after_mlx_lm_lora_is_imported(tmp_path):
    """`import mlx_lm.lora` teaches `yaml.SafeLoader` to read `0E0` as a float; a recipe FineTune
    wrote must still read back as the same strings in such a process (a script using both tools)."""
    import mlx_lm.lora  # noqa: F401  (the import is the point: mlx-lm 0.32 changes yaml.SafeLoader)
    recipe = recipes.load(None, {"template": "0E0", "model": "1e5", "data": "sql"}).unwrap()
    path = recipes.save(recipe, tmp_path / "r.yaml")
    assert recipes.load(path).unwrap() == recipe
