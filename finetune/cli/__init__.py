"""The `ft` command line: parse -> validate (core) -> unwrap Result -> shell -> exit code.

Exit codes: 0 success, 2 bad input (one line, no traceback), 1 internal error.
Commands are registered by import path so `ft --help` imports nothing heavy.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from cyclopts import App, CycloptsError

from finetune import __version__
from finetune.errors import Interrupted, UserError

app = App(
    name="ft",
    help="Fine-tune HuggingFace language models with LoRA on MLX.",
    version=__version__,
    result_action="return_value",
)
train = App(name="train", help="Train LoRA adapters; check recipes and data before training.")
app.command(train)
train.command("finetune.cli.train:quick", name="quick")
train.command("finetune.cli.train:start", name="start")
train.command("finetune.cli.train:validate", name="validate")
train.command("finetune.cli.train:list_data", name="list-data")
app.command("finetune.cli.generate:generate", name="generate")
models = App(name="models", help="Models on this machine: built-in tiny, converted cache, HF cache.")
app.command(models)
models.command("finetune.cli.models:list_models", name="list")
models.command("finetune.cli.models:info", name="info")
app.command("finetune.cli.fuse:fuse", name="fuse")
adapters = App(name="adapters", help="LoRA adapters: convert between mlx-lm and PEFT, inspect one.")
app.command(adapters)
adapters.command("finetune.cli.adapters:export", name="export")
adapters.command("finetune.cli.adapters:import_", name="import")
adapters.command("finetune.cli.adapters:inspect", name="inspect")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `ft`; returns (and as a script exits with) the exit code."""
    tokens = list(sys.argv[1:] if argv is None else argv)
    try:
        result = app(tokens, exit_on_error=False, print_error=True, help_on_error=False)
    except CycloptsError:
        return 2  # cyclopts already printed a one-line reason
    except Interrupted as err:
        print(f"ft: {err}", file=sys.stderr)
        return 130
    except UserError as err:
        print(f"ft: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ft: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # an internal error: short by default, the traceback on request
        if os.environ.get("FT_DEBUG"):
            raise
        print(f"ft: internal error: {type(err).__name__}: {err} (set FT_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    return result if isinstance(result, int) else 0


def _entry() -> None:
    from finetune.shell.blas import reexec_with_blas

    reexec_with_blas(sys.argv[1:])  # before anything imports mlx: LD_PRELOAD acts at exec only
    sys.exit(main())
