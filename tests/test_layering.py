"""The import graph runs one way (README "Layout"): core <- files <- engines <- shell <- cli/api.

Every `import`/`from ... import` of `finetune` modules, at the top of a module or inside a
function, is read with `ast` (nothing is imported). The rules, with no exceptions:

1. A module imports only its own layer and the layers below it:
   0 `finetune.errors`, `finetune.core.*`; 1 `finetune.files.*`; 2 `finetune.engines` (the
   registry), `finetune.engines.{protocol,choose,watchdog}`; 3 one engine package,
   `finetune.engines.mlx.*` or `finetune.engines.torch.*`; 4 `finetune.shell.*`;
   5 `finetune.cli.*`, `finetune.api`, `finetune` (the package root).
2. The two engine packages never import each other.
3. Above the engines (layers 4 and 5) an engine package is never imported: engines are reached
   through the registry, `finetune.engines.get(name)`.
4. No cycle between packages (a package: core, files, engines, engines.mlx, engines.torch, each
   `shell.<sub>` package, the shell's own modules, cli, api).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "finetune"
ENGINES = ("finetune.engines.mlx", "finetune.engines.torch")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports(name: str, path: Path) -> set[str]:
    """The `finetune` modules `path` imports anywhere (a `from X import y` of a submodule names it)."""
    known = modules()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*up, base] if base else up)
            submodules = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known}
            found |= submodules or {base}  # `from finetune import engines` imports the registry
    return {m for m in found if m == "finetune" or m.startswith("finetune.")}


def layer(name: str) -> int:
    if name == "finetune.errors" or name.startswith("finetune.core"):
        return 0
    if name.startswith("finetune.files"):
        return 1
    if name.startswith(ENGINES):
        return 3
    if name.startswith("finetune.engines"):
        return 2
    if name.startswith("finetune.shell"):
        return 4
    if name in ("finetune", "finetune.api") or name.startswith("finetune.cli"):
        return 5
    raise AssertionError(f"{name}: a module outside every layer; give it one in this test's docstring and `layer`")


def package(name: str) -> str:
    """The unit cycles are checked between."""
    for prefix in (*ENGINES, "finetune.core", "finetune.files", "finetune.cli"):
        if name == prefix or name.startswith(prefix + "."):
            return prefix
    parts = name.split(".")
    if parts[:2] == ["finetune", "shell"]:
        sub = ".".join(parts[:3])
        return sub if (ROOT.parent / Path(*parts[:3])).is_dir() else "finetune.shell"
    if parts[:2] == ["finetune", "engines"]:
        return "finetune.engines"
    return name  # finetune, finetune.api, finetune.errors


def edges() -> list[tuple[str, str]]:
    return [(name, target) for name, path in modules().items() for target in sorted(imports(name, path))]


def against_the_direction(pairs: list[tuple[str, str]]) -> list[str]:
    return [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})" for a, b in pairs if layer(b) > layer(a)]


def between_engines(pairs: list[tuple[str, str]]) -> list[str]:
    return [f"{a} imports {b}" for a, b in pairs
            if a.startswith(ENGINES) and b.startswith(ENGINES) and a.split(".")[2] != b.split(".")[2]]


def around_the_registry(pairs: list[tuple[str, str]]) -> list[str]:
    return [f"{a} imports {b}" for a, b in pairs if layer(a) > 3 and b.startswith(ENGINES)]


def package_cycle(pairs: list[tuple[str, str]]) -> list[str]:
    """One cycle between packages (empty: none)."""
    graph: dict[str, set[str]] = {}
    for a, b in pairs:
        if package(a) != package(b):
            graph.setdefault(package(a), set()).add(package(b))
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return []

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return []


def test_every_import_points_down_or_sideways():
    wrong = against_the_direction(edges())
    assert not wrong, "\n".join(wrong)


def test_the_engines_never_import_each_other():
    wrong = between_engines(edges())
    assert not wrong, "\n".join(wrong)


def test_above_the_engines_an_engine_is_reached_through_the_registry():
    wrong = around_the_registry(edges())
    assert not wrong, "\n".join(wrong)


def test_no_cycle_between_packages():
    cycle = package_cycle(edges())
    assert not cycle, "a cycle between packages: " + " -> ".join(cycle)


def test_each_rule_catches_its_violation(tmp_path):
    """The reader finds imports inside functions and resolves relative ones, and each rule fails on
    an edge that breaks it (so the tests above cannot pass by missing them)."""
    fake = tmp_path / "module.py"
    fake.write_text("def f():\n    from finetune.engines.mlx import step\n    from ..training import loop\n", encoding="utf-8")
    found = imports("finetune.shell.serve.fake", fake)
    assert {"finetune.engines.mlx.step", "finetune.shell.training.loop"} <= found
    assert around_the_registry([("finetune.shell.serve.fake", "finetune.engines.mlx.step")])
    assert not around_the_registry([("finetune.shell.serve.fake", "finetune.engines")])
    assert against_the_direction([("finetune.files.weights", "finetune.shell.export.tensorfile")])
    assert against_the_direction([("finetune.core.lora", "finetune.files.paths")])
    assert not against_the_direction([("finetune.engines.mlx.load", "finetune.files.weights")])
    assert between_engines([("finetune.engines.torch.load", "finetune.engines.mlx.load")])
    assert not between_engines([("finetune.engines.mlx.load", "finetune.engines.mlx.lora")])
    assert package_cycle([("finetune.shell.training.run", "finetune.shell.evaluation.training"),
                          ("finetune.shell.evaluation.rows", "finetune.shell.training.recipes")])
    assert not package_cycle([("finetune.shell.training.run", "finetune.shell.evaluation.training")])
    assert package("finetune.shell.generation") == "finetune.shell"
    assert package("finetune.shell.training.loop") == "finetune.shell.training"
