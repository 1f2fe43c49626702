"""`ft serve`: an OpenAI-compatible HTTP server on one base model and any number of its adapters."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Annotated, Literal

from cyclopts import Parameter
from returns.result import Failure

from finetune.errors import UserError, unwrap

INSTALL = "ft serve needs starlette and uvicorn (the serve extra): pip install 'finetune-lora[serve]'"


def serve(
    model: str,
    /,
    *,
    adapter: Annotated[tuple[str, ...], Parameter(consume_multiple=False)] = (),
    host: str = "127.0.0.1",
    port: int = 8080,
    api_key: str | None = None,
    backend: Literal["auto", "mlx", "torch"] | None = None,
    template: str | None = None,
    device: Literal["cpu", "gpu"] | None = None,
    verbose: Annotated[bool, Parameter(name=["--verbose", "-v"], negative=())] = False,
) -> int:
    """Serve a model and its adapters over OpenAI's HTTP API (chat, completions, models).

    Requests run one at a time on the thread that owns the model; `"model": NAME` picks an adapter
    per request without reloading the base. POST /v1/adapters {"name", "path"} adds one while
    serving, DELETE /v1/adapters/NAME removes it. Ctrl-C stops after open requests (5 s at most).

    Parameters
    ----------
    model
        The base model: local HF-format directory, a .gguf file, cached hub id (org/name), or tiny. Requests name it as given.
    adapter
        NAME=RUN: serve the adapter in RUN (a run, checkpoint, mlx-lm or PEFT adapter directory) as model NAME; repeatable.
    host
        Address to listen on; the default answers this machine only. Anything else (0.0.0.0) must be given explicitly, and wants --api-key.
    port
        TCP port; 0 picks a free one (the URL printed when ready says which).
    api_key
        Require the header 'Authorization: Bearer KEY' on every route but /health; default: $FT_API_KEY, else none.
    backend
        Engine: mlx, torch (transformers; float checkpoints) or auto (default; $FT_BACKEND). Greedy text is the same in both.
    template
        Chat template of /v1/chat/completions: chatml, llama3, llama2, alpaca, plain, tokenizer, a Jinja string or file. Default: the tokenizer's own, else chatml. /v1/completions prompts are raw text.
    device
        cpu or gpu (Metal, CUDA or MPS); default: a GPU when the engine has one, else the CPU.
    verbose
        Log every request (uvicorn's access log).
    """
    if not all(importlib.util.find_spec(m) for m in ("starlette", "uvicorn")):
        raise UserError(INSTALL)
    from finetune.engines import choose
    from finetune.shell.serve import engines, server
    from finetune.shell.serve.app import Served
    from finetune.shell.serve.worker import Worker

    named = _adapters(adapter, model)
    key = api_key if api_key is not None else os.environ.get("FT_API_KEY") or None
    if key is not None and not key.strip():
        raise UserError("--api-key is empty; give a key, or leave the flag out")
    engine_name, why = choose.for_model(backend, model, adapter_quantized=any(map(_trained_quantized, named.values())))
    sock = server.bind(host, port)  # before the weights: a busy port should not cost a load first
    engine = engines.make(engine_name)
    worker = Worker(engine, None)
    try:
        unwrap(worker.start(lambda: engine.load(model, device, why)))
        chat_template = engine.tokenizer.chat_template or ""
        worker.template = unwrap(_template(template or "auto", chat_template))
        served = Served(model, worker)
        for name, path in named.items():
            swap = worker.submit(lambda p=path: engine.prepare(p)).result()
            if isinstance(swap, Failure):
                raise UserError(f"--adapter {name}={path}: {swap.failure()}")
            served.publish(name, path, swap.unwrap())
    except BaseException:
        worker.stop()
        sock.close()
        raise
    url = server.url_of(sock)
    lines = [f"ft serve: {url} ({engine_name}); models: {', '.join(served.names())}"]
    if not server.loopback(host) and key is None:
        lines.append(f"ft serve: warning: listening on {host} without --api-key: anyone who reaches this machine can use it")
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn raises Ctrl-C again once it has shut down
        server.run(served, sock, key, verbose, lines)
    print("ft serve: stopped", file=sys.stderr)
    return 0


def _adapters(values: tuple[str, ...], model: str) -> dict[str, str]:
    """--adapter NAME=RUN values -> {name: absolute directory}, each checked."""
    from finetune.shell.serve.errors import ApiError
    from finetune.shell.serve.protocol import check_adapter_name

    out: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not path:
            raise UserError(f"--adapter {value}: expected NAME=RUN (e.g. --adapter sql=runs/sql)")
        if name == model or name in out:
            raise UserError(f"--adapter {value}: the name {name!r} is already taken; give each adapter its own NAME")
        try:
            check_adapter_name(name, [])
        except ApiError as err:
            raise UserError(f"--adapter {value}: {err.message}") from None
        directory = Path(path).expanduser()
        if not directory.is_dir():
            raise UserError(f"--adapter {value}: {path}: no such directory")
        out[name] = str(directory.resolve())
    return out


def _trained_quantized(adapter: str) -> bool:
    from finetune.cli.generate import _trained_quantized as recorded

    return recorded(Path(adapter))


def _template(name: str, chat_template: str):
    from finetune.cli.generate import _template as chosen

    return chosen(name, chat_template)
