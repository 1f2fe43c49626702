"""Recipe files (TOML or YAML) -> raw tables; resolved recipes -> TOML on disk."""

from __future__ import annotations

import functools
import tomllib
from pathlib import Path
from typing import Any

from returns.result import Failure, Result, Success

from finetune.core import flags as core_flags
from finetune.core import recipe as core_recipe
from finetune.core import tomlout
from finetune.core.config import Recipe
from finetune.files.paths import write_text

SUFFIXES = (".toml", ".yaml", ".yml")


def read_raw(path: str | Path) -> Result[dict[str, Any], str]:
    """Parse a recipe file; syntax errors name the file and line."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        return Failure(f"{path}: a recipe must be .toml, .yaml or .yml")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Failure(f"{path}: no such recipe file")
    except (OSError, UnicodeDecodeError) as err:
        return Failure(f"{path}: cannot read ({err})")
    if path.suffix == ".toml":
        try:
            return Success(tomllib.loads(text))
        except tomllib.TOMLDecodeError as err:
            return Failure(f"{path}: invalid TOML: {err}")
    import yaml

    try:
        raw = yaml_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        return Failure(f"{path}: invalid YAML: {where}{getattr(err, 'problem', None) or err}")
    if raw is None:
        return Success({})
    if not isinstance(raw, dict):
        return Failure(f"{path}: a recipe must be a table of settings, got {type(raw).__name__}")
    return Success(raw)


def load(path: str | Path | None, flags: dict[str, Any] | None = None) -> Result[Recipe, str]:
    """Recipe file (optional) with flag overrides on top, through one validation path."""
    layers: list[core_recipe.Layer] = []
    if path is not None:
        match read_raw(path):
            case Success(raw):
                layers.append((str(path), raw))
            case Failure(message):
                return Failure(message)
    if flags:
        layers.append(("command line", core_flags.layer(flags)))
    return core_recipe.resolve(layers)


def save(recipe: Recipe, path: str | Path) -> Path:
    """Write the resolved recipe as TOML, or YAML for a .yaml/.yml path (atomically); loading it
    gives the same Recipe."""
    raw = core_recipe.to_builtins(recipe)
    if Path(path).suffix in (".yaml", ".yml"):
        return write_text(path, yaml_dump(raw))
    return write_text(path, tomlout.dumps(raw))


@functools.cache
def _yaml_classes():
    """A safe loader and dumper with YAML's own resolvers, whatever else the process has imported.

    `import mlx_lm.lora` adds a float resolver to `yaml.SafeLoader` itself (so `1e-5` reads as a
    number): after it, `safe_load(safe_dump({"template": "0E0"}))` no longer gives the string
    back. These classes take PyYAML's untouched resolver table instead.
    """
    import yaml
    from yaml.resolver import Resolver

    table = {first: list(pairs) for first, pairs in Resolver.yaml_implicit_resolvers.items()}
    loader = type("RecipeLoader", (yaml.SafeLoader,), {"yaml_implicit_resolvers": table})
    dumper = type("RecipeDumper", (yaml.SafeDumper,), {"yaml_implicit_resolvers": table})
    return loader, dumper


def yaml_load(text: str) -> Any:
    """`yaml.safe_load` with YAML's own resolvers (see `_yaml_classes`)."""
    import yaml

    return yaml.load(text, Loader=_yaml_classes()[0])  # noqa: S506 (a SafeLoader subclass)


def yaml_dump(raw: Any) -> str:
    """`yaml.safe_dump` (keys in order) that `yaml_load` reads back as it was."""
    import yaml

    return yaml.dump(raw, Dumper=_yaml_classes()[1], sort_keys=False)


def bundled(name: str) -> Path:
    """A recipe shipped with FineTune (`recipes/NAME.toml` in a checkout, or inside the wheel)."""
    here = Path(__file__).resolve().parent.parent  # the package: data/ and recipes/ sit beside it
    for root in (here.parent / "recipes", here / "recipes"):
        if (root / f"{name}.toml").is_file():
            return root / f"{name}.toml"
    return here.parent / "recipes" / f"{name}.toml"
