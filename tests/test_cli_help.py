"""`ft --help` stays fast and its command summaries match the commands' docstrings."""

from __future__ import annotations

import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

CLI = Path(__file__).parents[1] / "finetune" / "cli" / "__init__.py"
REGISTERED = re.compile(r'command\("([\w.]+):(\w+)", name="([\w-]+)", help="([^"]*)"\)')


def registrations() -> list[tuple[str, str, str, str]]:
    return REGISTERED.findall(CLI.read_text())


def test_every_lazy_command_has_its_docstring_summary_as_help():
    found = registrations()
    assert len(found) >= 11  # train x4, generate, models x2, fuse, adapters x3
    for module, func, name, help_text in found:
        doc = inspect.getdoc(getattr(importlib.import_module(module), func))
        assert doc, f"{module}:{func} has no docstring"
        assert help_text == doc.splitlines()[0], f"ft ... {name}: help differs from the docstring"


def test_no_command_is_registered_without_help():
    text = CLI.read_text()
    lazy = re.findall(r'command\("[\w.]+:\w+"[^)]*\)', text)
    assert lazy and all("help=" in call for call in lazy), lazy


def test_help_lists_commands_and_imports_no_mlx():
    code = "import sys; from finetune.cli import main; rc = main(['--help']); print('mlx' in sys.modules, 'transformers' in sys.modules); sys.exit(rc)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False False")
    for name in ("train", "generate", "fuse", "models", "adapters"):
        assert name in out
