"""Recipes survive encode -> TOML/YAML -> decode unchanged; the TOML writer is inverted by tomllib."""

from __future__ import annotations

import math
import tomllib

import msgspec
import msgspec.inspect as mi
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from returns.result import Success

from finetune.core import recipe as core_recipe
from finetune.core import tomlout
from finetune.core.config import Recipe
from finetune.shell import recipes as recipe_files

INT64 = 2**63 - 1
SETTINGS = settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])

# Any text a TOML basic string can hold: everything but lone surrogates (st.text never makes them).
any_text = st.text(max_size=12)


def for_type(t: mi.Type) -> st.SearchStrategy:
    """A strategy for values `msgspec.convert` accepts for `t`, read off its `Meta` bounds."""
    match t:
        case mi.Metadata():  # a field's description (its flag help) wraps the bounded type
            return for_type(t.type)
        case mi.BoolType():
            return st.booleans()
        case mi.IntType():
            lo = t.ge if t.ge is not None else (t.gt + 1 if t.gt is not None else -INT64)
            hi = t.le if t.le is not None else (t.lt - 1 if t.lt is not None else INT64)
            return st.integers(lo, hi)
        case mi.FloatType():
            return st.floats(
                min_value=t.ge if t.ge is not None else t.gt,
                max_value=t.le if t.le is not None else t.lt,
                exclude_min=t.gt is not None,
                exclude_max=t.lt is not None,
                allow_nan=False,
                allow_infinity=False,
            )
        case mi.StrType(pattern=str() as pattern):
            return st.from_regex(pattern, fullmatch=True).filter(
                lambda s: len(s) >= (t.min_length or 0)
            )
        case mi.StrType():
            return st.text(min_size=t.min_length or 0, max_size=12)
        case mi.LiteralType():
            return st.sampled_from(t.values)
        case mi.VarTupleType():
            return st.lists(for_type(t.item_type), min_size=t.min_length or 0, max_size=4)
        case mi.StructType():
            return st.fixed_dictionaries({f.name: for_type(f.type) for f in t.fields})
    raise AssertionError(f"no strategy for {t!r}")


def _consistent(raw: dict) -> dict:
    """Satisfy the cross-field rules of `__post_init__` the Meta bounds cannot state."""
    lora, train = dict(raw["lora"]), dict(raw["train"])
    if lora["num_layers"] == 0:
        lora["num_layers"] = -1
    if not lora["keys"]:
        lora["keys"] = ["all-linear"]
    if lora["alpha"]:
        lora["scale"] = lora["alpha"] / lora["rank"]
    if train["iters"] and train["epochs"]:
        train["epochs"] = 0
    if not train["iters"] and not train["epochs"]:
        train["iters"] = 1
    train["min_learning_rate"] = min(train["min_learning_rate"], train["learning_rate"])
    if train["val_batches"] == 0:
        train["val_batches"] = -1
    if 0 < train["max_seq_length"] < 8:
        train["max_seq_length"] = 0
    return {**raw, "lora": lora, "train": train}


def _decodes(raw: dict) -> bool:
    return isinstance(core_recipe.decode(raw), Success)


raw_recipes = for_type(mi.type_info(Recipe)).map(_consistent).filter(_decodes)
recipes = raw_recipes.map(lambda raw: core_recipe.decode(raw).unwrap())


@SETTINGS
@given(recipes)
def test_toml_round_trip_is_identity(recipe):
    text = tomlout.dumps(core_recipe.to_builtins(recipe))
    assert core_recipe.decode(tomllib.loads(text)) == Success(recipe)


@SETTINGS
@given(recipes)
def test_resolving_a_written_recipe_gives_it_back(recipe):
    """What `recipes.save` writes, `recipes.load` reads back: profile and derivations change nothing."""
    raw = tomllib.loads(tomlout.dumps(core_recipe.to_builtins(recipe)))
    assert core_recipe.resolve([("saved.toml", raw)]) == Success(recipe)


@SETTINGS
@given(recipes)
def test_yaml_round_trip_is_identity(recipe):
    text = recipe_files.yaml_dump(core_recipe.to_builtins(recipe))
    assert core_recipe.decode(recipe_files.yaml_load(text)) == Success(recipe)


@SETTINGS
@given(recipes)
def test_to_builtins_is_plain_data_and_does_not_touch_the_recipe(recipe):
    before = msgspec.json.encode(recipe)
    table = core_recipe.to_builtins(recipe)
    assert set(table) == {f.name for f in msgspec.structs.fields(Recipe)}
    assert list(table["lora"]["keys"]) == list(recipe.lora.keys)
    assert msgspec.json.encode(recipe) == before


@SETTINGS
@given(raw_recipes, st.sampled_from(["batch_size", "rank", "learning_rate", "max_seq_length"]))
def test_an_out_of_bounds_value_is_named_with_its_path(raw, field):
    section = "lora" if field == "rank" else "train"
    bad = {"batch_size": 0, "rank": 0, "learning_rate": -1.0, "max_seq_length": 7}[field]
    broken = {**raw, section: {**raw[section], field: bad}}
    message = core_recipe.decode(broken, [("r.toml", broken)]).failure()
    assert message.startswith(f"r.toml: $.{section}.{field}: ")
    assert ("must be 0 (the model's context) or >= 8" if field == "max_seq_length" else "expected ") in message
    assert message.endswith(f"got {bad!r}")


# --- the TOML writer on arbitrary tables ---------------------------------------------------------

scalars = st.one_of(
    st.booleans(),
    st.integers(-INT64 - 1, INT64),
    st.floats(allow_nan=False),
    st.text(max_size=16),
    st.sampled_from(
        ['"', "\\", '\\"', "\n", "\r\n", "\t", "\x00", "\x1f", "\x7f", "é", "日本", "\u2028", "'''"]
    ),
)
arrays = st.recursive(
    st.lists(scalars, max_size=4), lambda inner: st.lists(inner, max_size=3), max_leaves=8
)
keys = st.one_of(
    st.text(max_size=8), st.sampled_from(["", "a.b", "a b", "é", "[x]", '"', "1", "true", "-_"])
)
tables = st.recursive(
    st.dictionaries(keys, st.one_of(scalars, arrays), max_size=4),
    lambda inner: st.dictionaries(keys, st.one_of(scalars, arrays, inner), max_size=4),
    max_leaves=12,
)


@SETTINGS
@given(tables)
def test_tomlout_is_inverted_by_tomllib(table):
    assert tomllib.loads(tomlout.dumps(table)) == table


@SETTINGS
@given(st.floats(allow_nan=False))
def test_floats_keep_their_exact_value_and_type(x):
    back = tomllib.loads(tomlout.dumps({"x": x}))["x"]
    assert isinstance(back, float)
    assert back == x and math.copysign(1.0, back) == math.copysign(1.0, x)


def test_nan_and_infinities():
    back = tomllib.loads(tomlout.dumps({"n": math.nan, "p": math.inf, "m": -math.inf}))
    assert math.isnan(back["n"]) and back["p"] == math.inf and back["m"] == -math.inf
