"""The `ft` command line: parse -> validate (core) -> unwrap Result -> shell -> exit code.

Exit codes: 0 success, 2 bad input (one line, no traceback), 1 internal error.
Commands are registered by import path so `ft --help` imports nothing heavy; their `help=` is
the command docstring's first line (a test keeps the two equal).
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
train_app = App(name="train", help="Train LoRA adapters; check recipes and data before training.")
app.command(train_app)
train_app.command("finetune.cli.train:quick", name="quick", help="A short LoRA run with sensible defaults, then a sample before and after.")
train_app.command("finetune.cli.train:start", name="start", help="Train LoRA adapters.")
train_app.command("finetune.cli.train:validate", name="validate", help="Check a recipe or a dataset without training.")
train_app.command("finetune.cli.train:recipe", name="recipe", help="Write a recipe file (TOML, or YAML for .yaml/.yml) from a recipe and flags, without training.")
train_app.command("finetune.cli.train:list_data", name="list-data", help="List bundled datasets, datasets in the current directory, and any PATHS given.")
train_app.command("finetune.cli.plot:plot", name="plot", help="Write a PNG comparing runs: train and validation loss by step, one colour per run.")
app.command("finetune.cli.generate:generate", name="generate", help="Generate text with the KV cache, streamed to stdout; speed and backend go to stderr.")
app.command("finetune.cli.serve:serve", name="serve", help="Serve a model and its adapters over OpenAI's HTTP API (chat, completions, models).")
models_app = App(name="models", help="Models on this machine: built-in tiny, converted cache, HF cache.")
app.command(models_app)
models_app.command("finetune.cli.models:list_models", name="list", help="List the built-in tiny model, converted caches, .gguf files used as MODEL and HF-cache models.")
models_app.command("finetune.cli.models:info", name="info", help="Describe a model: architecture, sizes, dtype, chat template and a LoRA memory estimate.")
app.command("finetune.cli.eval:eval_", name="eval", help="Score a model and its adapters on held-out rows: exact match, loss, perplexity, speed.")
app.command("finetune.cli.fuse:fuse", name="fuse", help="Merge every LoRA pair into its base weight and write a complete HF model directory.")
app.command("finetune.cli.export:export", name="export", help="Write a run's adapter or fused model for llama.cpp and Ollama (GGUF) or for transformers + peft.")
adapters_app = App(name="adapters", help="LoRA adapters: convert between mlx-lm and PEFT, inspect one.")
app.command(adapters_app)
adapters_app.command("finetune.cli.adapters:export", name="export", help="Write an adapter in another format: PEFT (adapter_model.safetensors) or mlx-lm.")
adapters_app.command("finetune.cli.adapters:import_", name="import", help="Convert a PEFT LoRA adapter to mlx-lm's format (what ft and mlx_lm load).")
adapters_app.command("finetune.cli.adapters:inspect", name="inspect", help="Explain an adapter: format, rank, scale, targets, layers, size, base model; with --model, whether it fits.")


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
    """The `ft` script. Importing `finetune` (above) already loaded the BLAS, before any MLX."""
    sys.exit(main())
