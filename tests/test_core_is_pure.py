"""`finetune/core` is pure: its imports (followed through finetune.*) never reach effects."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "finetune"
CORE = sorted((PACKAGE / "core").rglob("*.py"))

# Modules that do I/O, talk to the console, the network, the clock or a global RNG.
FORBIDDEN = (
    "finetune.shell",
    "finetune.cli",
    "transformers",
    "huggingface_hub",
    "safetensors",
    "tokenizers",
    "os",
    "sys",
    "io",
    "pathlib",
    "shutil",
    "tempfile",
    "subprocess",
    "socket",
    "urllib",
    "http",
    "requests",
    "time",
    "random",
    "glob",
    "rich",
    "mlx",  # the core serves both engines (and fuse/adapters with neither): NumPy only
    "mlx_lm",
    "torch",
    "peft",
)
FORBIDDEN_CALLS = ("open", "print", "input", "breakpoint")
# The one effect of importing the package: an optimized BLAS must enter the process's global symbol
# scope before anything imports MLX, so `finetune/__init__.py` loads it (core code never calls it).
BLAS_BOOT = ("finetune", "finetune.engines")  # `finetune.engines.boot()`
FORBIDDEN_METHODS = ("read_text", "write_text", "read_bytes", "write_bytes")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_path(name: str) -> Path | None:
    """The source file of a `finetune.*` module, or None when it is not ours."""
    if name != "finetune" and not name.startswith("finetune."):
        return None
    base = PACKAGE.parent.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def nodes(tree: ast.AST, lazy: bool):
    """All nodes, or (lazy=False) only those run on import: not inside function bodies."""
    if lazy:
        yield from ast.walk(tree)
        return
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            todo += ast.iter_child_nodes(node)


def imports(tree: ast.AST, name: str, is_package: bool, lazy: bool = True) -> list[str]:
    """Every module a source imports (with `lazy`, also inside functions, and `__import__`)."""
    package = name if is_package else name.rpartition(".")[0]
    out: list[str] = []
    for node in nodes(tree, lazy):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            out.append(base)
            out += [f"{base}.{a.name}" for a in node.names if module_path(f"{base}.{a.name}")]
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Name) and node.func.id == "__import__")
                or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
            )
        ):
            out.append(node.args[0].value)
    return out


def effects(tree: ast.AST) -> list[str]:
    """Calls of open/print/... and of file-reading or -writing methods."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        if isinstance(node.func, ast.Name) and node.func.id in FORBIDDEN_CALLS:
            found.append(f"line {node.lineno}: {node.func.id}(")
        if isinstance(node.func, ast.Attribute) and node.func.attr in FORBIDDEN_METHODS:
            found.append(f"line {node.lineno}: .{node.func.attr}(")
    return found


def forbidden(module: str) -> bool:
    return any(module == f or module.startswith(f + ".") for f in FORBIDDEN)


def violations(source: str, name: str, is_package: bool = False, read=None) -> list[str]:
    """Walk imports from one module through every `finetune.*` module it reaches."""
    read = read or (lambda p: p.read_text(encoding="utf-8"))
    problems: list[str] = []
    seen: set[str] = set()
    todo = [(name, source, is_package, [name])]
    while todo:
        mod, text, pkg, chain = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        tree = ast.parse(text)
        # core modules count whole (any function may run); a parent package such as
        # finetune/__init__.py only with what runs when a core module is imported
        in_core = mod == "finetune.core" or mod.startswith("finetune.core.")
        if in_core:
            problems += [f"{' -> '.join(chain)}: {e}" for e in effects(tree)]
        for target in imports(tree, mod, pkg, lazy=in_core):
            if (mod, target) == BLAS_BOOT:
                continue
            if forbidden(target):
                problems.append(f"{' -> '.join(chain)} imports {target}")
                continue
            # importing a.b.c runs a/__init__.py and a/b/__init__.py as well
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                sub = ".".join(parts[:i])
                path = module_path(sub)
                if path is not None and sub not in seen:
                    todo.append((sub, read(path), path.name == "__init__.py", [*chain, sub]))
    return problems


def test_core_has_modules():
    names = {module_name(p) for p in CORE}
    assert {"finetune.core.records", "finetune.core.templates", "finetune.core.recipe"} <= names


@pytest.mark.parametrize("path", CORE, ids=lambda p: p.name)
def test_core_module_is_pure(path):
    name = module_name(path)
    assert violations(path.read_text(encoding="utf-8"), name, path.name == "__init__.py") == []


def test_the_checker_catches_violations():
    """The walk must see direct, lazy, relative and transitive imports, and effectful calls."""
    assert violations("import transformers\n", "finetune.core.x") == [
        "finetune.core.x imports transformers"
    ]
    assert violations("def f():\n    from safetensors import safe_open\n", "finetune.core.x")
    assert "finetune.core.x imports finetune.shell" in violations(
        "from ..shell import datasets\n", "finetune.core.x"
    )
    assert violations("m = __import__('huggingface_hub')\n", "finetune.core.x")
    assert violations("def f(p):\n    return p.read_text()\n", "finetune.core.x")
    assert violations("print('hi')\n", "finetune.core.x") == ["finetune.core.x: line 1: print("]
    assert violations("with open('f') as f:\n    pass\n", "finetune.core.x")
    # transitively: core.x imports core.records, whose (substituted) source imports the CLI
    found = violations(
        "from finetune.core import records\n",
        "finetune.core.x",
        read=lambda p: "import finetune.cli\n" if p.stem == "records" else p.read_text(),
    )
    assert "finetune.core.x -> finetune.core.records imports finetune.cli" in found
    assert violations("import math\nfrom collections.abc import Mapping\n", "finetune.core.x") == []
    assert violations("def f(x):\n    import mlx.core as mx\n    return mx.array(x)\n", "finetune.core.x")
    assert violations("import torch.nn\n", "finetune.core.x") == ["finetune.core.x imports torch.nn"]


def test_importing_finetune_and_its_core_loads_no_engine():
    """A fresh interpreter: `import finetune` and every core module leave MLX and torch unloaded."""
    names = ", ".join(sorted(module_name(p) for p in CORE))
    script = (f"import sys, finetune, {names}\n"
              "print(sorted({m.split('.')[0] for m in sys.modules} & {'mlx', 'mlx_lm', 'torch', 'peft', 'transformers'}))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
