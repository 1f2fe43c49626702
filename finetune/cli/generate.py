"""`ft generate`: sample from a model (optionally with a LoRA adapter), streamed to stdout."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Literal

from cyclopts import Parameter
from returns.result import Failure, Result, Success

from finetune.errors import UserError, unwrap


def generate(
    model: str,
    /,
    *,
    prompt: str | None = None,
    messages: str | None = None,
    template: str | None = None,
    adapter: Path | None = None,
    max_tokens: int = 256,
    temp: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    device: Literal["cpu", "gpu"] | None = None,
    backend: Literal["auto", "mlx", "torch"] | None = None,
    verbose: Annotated[bool, Parameter(name=["--verbose", "-v"], negative=())] = False,
) -> int:
    """Generate text with the KV cache, streamed to stdout; speed and backend go to stderr.

    Parameters
    ----------
    model
        Local HF-format directory, a .gguf file, cached hub id (org/name), or tiny.
    prompt
        Prompt text, tokenized as-is (BOS per the tokenizer); with --template, a user message.
    messages
        A conversation as a JSON list of {"role", "content"} objects, inline or a .json file.
    template
        Chat template for --messages/--prompt: chatml, llama3, llama2, alpaca, plain, tokenizer, a Jinja string or file. Default for --messages: the tokenizer's own, else chatml.
    adapter
        LoRA adapter directory (adapters.safetensors + adapter_config.json).
    max_tokens
        Most tokens to generate.
    temp
        Sampling temperature; 0 is greedy (argmax).
    top_p
        Nucleus sampling: sample among the most likely tokens holding this much probability.
    seed
        Seed of the sampling key; the same seed gives the same text.
    device
        cpu or gpu (Metal, CUDA or MPS); default: a GPU when the engine has one, else the CPU.
    backend
        Engine: mlx, torch (transformers; float checkpoints) or auto (default; $FT_BACKEND). Greedy text is the same in both; seeded sampling differs.
    verbose
        Also print the prompt's token count, the stop tokens and BLAS details.
    """
    if (prompt is None) == (messages is None):
        raise UserError("give exactly one of --prompt and --messages")
    _check_flags(max_tokens, temp, top_p)

    chat = None if messages is None else _messages(messages)

    from finetune import engines
    from finetune.engines import choose
    from finetune.shell.generation import TextStream, build_prompt, decoder

    name, why = choose.for_model(backend, model, adapter_quantized=_trained_quantized(adapter))
    engine = engines.get(name)
    say = lambda line: print(line, file=sys.stderr)  # noqa: E731  (the backend line: MLX's before loading)
    net, tokenizer = unwrap(engine.load(model, adapter=None if adapter is None else str(adapter), device=device,
                                        why=why, say=say, verbose=verbose))
    chosen = None
    if chat is not None or template is not None:
        chosen = unwrap(_template(template or "auto", tokenizer.chat_template or ""))
    plan = unwrap(build_prompt(tokenizer, text=prompt, messages=chat or (), template=chosen))
    if not plan.ids:
        raise UserError("the prompt is empty")
    if verbose:
        print(f"prompt: {len(plan.ids)} tokens; stop ids {list(plan.stop_ids)}, "
              f"stop strings {list(plan.stop_strings)}", file=sys.stderr)

    text = TextStream(decoder(tokenizer), plan.stop_strings)
    start = time.perf_counter()
    first = end = start
    count = 0
    for token in engine.generate(net, plan.ids, max_tokens=max_tokens, temp=temp, top_p=top_p,
                        seed=seed, stop_ids=plan.stop_ids):
        if count == 0:
            first = time.perf_counter()  # prefill + the first token
        count += 1
        _write(text.add(token))
        if text.stopped:
            break
    end = time.perf_counter()
    _write(text.finish() + "\n")
    prompt_rate = len(plan.ids) / (first - start) if count else 0.0
    rate = (count - 1) / (end - first) if count > 1 else 0.0
    print(f"{count} tokens, {rate:.1f} tokens/s (prompt: {len(plan.ids)} tokens, "
          f"{prompt_rate:.1f} tokens/s)", file=sys.stderr)
    return 0


def _trained_quantized(adapter: Path | None) -> bool:
    """The adapter records a quantized base (only the MLX engine rebuilds one)."""
    try:
        config = json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8")) if adapter else {}
    except (OSError, ValueError):
        return False  # loading the adapter reports what is wrong with it
    return isinstance(config, dict) and bool(config.get("base_quantization"))


def _check_flags(max_tokens: int, temp: float, top_p: float) -> None:
    if max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {max_tokens}")
    if temp < 0:
        raise UserError(f"--temp must be >= 0, got {temp}")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {top_p}")



def _write(text: str) -> None:
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()


def _messages(value: str) -> tuple:
    """--messages (inline JSON or a file) -> Messages, or a UserError naming the problem."""
    from finetune.core.records import normalise

    source, where = value, "--messages"
    if not value.lstrip().startswith(("[", "{")) and Path(value).is_file():
        try:
            source, where = Path(value).read_text(encoding="utf-8"), value
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"{value}: cannot read ({err})") from None
    try:
        parsed: Any = json.loads(source)
    except json.JSONDecodeError as err:
        raise UserError(
            f"{where}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); "
            'expected a list like [{"role": "user", "content": "..."}]'
        ) from None
    row = parsed if isinstance(parsed, dict) and "messages" in parsed else {"messages": parsed}
    match normalise(row, 1, "chat"):
        case Success(sample):
            return sample.messages
        case Failure(error):
            raise UserError(f"{where}: {error.message}")
    raise AssertionError("unreachable")


def _template(name: str, chat_template: str) -> Result:
    """--template: a built-in, tokenizer, Jinja text, or a file holding Jinja."""
    from finetune.shell.data import check

    from_file = "{" not in name and (Path(name).is_file() or name.endswith((".jinja", ".j2")))
    result = check.read_template(name, "chat", chat_template, "--template")
    return result if from_file else result.alt(lambda m: f"--template: {m}")  # file errors say it already
