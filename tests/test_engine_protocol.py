"""Both engines implement the one protocol (`finetune/engines/protocol.py`), found by name."""

from __future__ import annotations

import inspect

import pytest

from finetune import engines
from finetune.engines import protocol


def members(cls: type) -> set[str]:
    return {n for n, v in vars(cls).items() if not n.startswith("_") and (callable(v) or n in cls.__annotations__)}


@pytest.mark.parametrize("name", engines.NAMES)
def test_each_engine_implements_every_method_of_the_protocol(name):
    engine = engines.get(name)
    assert engine.name == name
    missing = [m for m in members(protocol.Engine) if not hasattr(engine, m)]
    assert not missing, f"{name} engine lacks {missing}"
    for m in members(protocol.Engine) - {"name"}:  # same parameter names, or a forwarding *args
        theirs = inspect.signature(getattr(engine, m)).parameters
        ours = [p for p in inspect.signature(getattr(protocol.Engine, m)).parameters if p != "self"]
        forwards = any(p.kind is p.VAR_POSITIONAL for p in theirs.values())
        named = [p for p, v in theirs.items() if v.kind is not inspect.Parameter.VAR_KEYWORD]
        assert forwards or named == [p for p in ours if p != "sampling"], f"{name}.{m}{inspect.signature(getattr(engine, m))}"


@pytest.mark.parametrize("name", engines.NAMES)
def test_each_engines_trainer_implements_every_method_of_the_protocol(name):
    step = __import__(f"finetune.engines.{name}.step", fromlist=["Trainer"])
    missing = [m for m in members(protocol.Trainer) - {"world"} if not callable(getattr(step.Trainer, m, None))]
    assert not missing, f"{name} Trainer lacks {missing}"


def test_an_unknown_engine_is_refused_by_name():
    with pytest.raises(ValueError, match="no engine named 'jax'; the engines are mlx, torch"):
        engines.get("jax")
