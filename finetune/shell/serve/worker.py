"""The one thread that owns the model: it loads it, then runs queued jobs one at a time.

A generation job reports through `emit` (called on the worker thread): ("start", prompt tokens),
("text", piece)..., then ("end", (finish_reason, completion tokens)) or ("error", ApiError).
Cancelling (the client went away) is checked before the job starts and between tokens.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import msgspec
from msgspec import Struct
from returns.result import Failure, Result, Success

from finetune.core.records import normalise
from finetune.shell.serve.engines import Engine, Swap
from finetune.shell.serve.errors import ApiError, bad_request
from finetune.shell.serve.protocol import Options

Emit = Callable[[tuple[str, Any]], None]


class Job(Struct, frozen=True, kw_only=True):
    """One generation: what to prompt with, which adapter, how to sample."""

    chat: dict[str, Any] | None  # a chat row {"messages": [...]}, or None for a raw prompt
    prompt: str | list[int]  # the raw prompt (completions): text or token ids
    swap: Swap | None
    options: Options


class Worker:
    """A daemon thread running `engine.load` first, then each submitted function in turn."""

    def __init__(self, engine: Engine, template: Any):
        self.engine = engine
        self.template = template  # what chat requests render with (finetune.core.templates)
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="ft-serve-model", daemon=True)
        self._loading: Future = Future()
        self.busy = False  # a job is running
        self.generated_tokens = 0  # since the start (GET /health reports it)

    def start(self, load: Callable[[], Result[None, str]]) -> Result[None, str]:
        """Start the thread, load the model on it, and wait for the outcome."""
        self._thread.start()
        self._jobs.put((load, self._loading))
        return self._loading.result()

    def queued(self) -> int:
        return self._jobs.qsize()

    def submit(self, fn: Callable[[], Any]) -> Future:
        future: Future = Future()
        self._jobs.put((fn, future))
        return future

    def stop(self, timeout: float = 5.0) -> None:
        self._jobs.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while (item := self._jobs.get()) is not None:
            fn, future = item
            if not future.set_running_or_notify_cancel():
                continue
            self.busy = True
            try:
                future.set_result(fn())
            except BaseException as err:  # reported to the caller, never kills the thread
                future.set_exception(err)
            finally:
                self.busy = False
        if self._loading.done() and self._loading.exception() is None:
            self.engine.close()

    def generate(self, job: Job, emit: Emit, cancelled: Callable[[], bool]) -> None:
        """Run `job` (on this thread), reporting through `emit`; never raises."""
        if cancelled():
            return
        try:
            self._generate(job, emit, cancelled)
        except ApiError as err:
            emit(("error", err))
        except Exception as err:  # noqa: BLE001  an engine failure: a 500 in OpenAI's shape, no traceback
            emit(("error", ApiError(500, f"generation failed: {type(err).__name__}: {err}", code="internal_error")))

    def _generate(self, job: Job, emit: Emit, cancelled: Callable[[], bool]) -> None:
        from finetune.shell.generation import TextStream, build_prompt, decoder

        tokenizer, options = self.engine.tokenizer, job.options
        plan = _unwrap(self._prompt(job, build_prompt), "messages" if job.chat else "prompt")
        max_tokens = self._fit(len(plan.ids), options)
        emit(("start", len(plan.ids)))
        text = TextStream(decoder(tokenizer), plan.stop_strings + options.stop)
        count, finish = 0, "stop"
        with self.engine.using(job.swap):
            for token in self.engine.tokens(list(plan.ids), max_tokens=max_tokens, temp=options.temp,
                                            top_p=options.top_p, seed=options.seed, stop_ids=plan.stop_ids):
                count += 1
                self.generated_tokens += 1
                piece = text.add(token)
                if piece:
                    emit(("text", piece))
                if text.stopped or cancelled():
                    break
            else:
                finish = "length" if count == max_tokens else "stop"
        if not text.stopped:
            rest = text.finish()
            if rest:
                emit(("text", rest))
        emit(("end", (finish, count)))

    def _prompt(self, job: Job, build_prompt: Callable) -> Result[Any, str]:
        tokenizer = self.engine.tokenizer
        if job.chat is None:
            if isinstance(job.prompt, list):
                vocab = len(tokenizer)
                if max(job.prompt) >= vocab:
                    return Failure(f"token id {max(job.prompt)} is outside the vocabulary (size {vocab})")
                ids = tuple(job.prompt)  # the stops of a raw prompt, with the client's ids
                return build_prompt(tokenizer, text="").map(lambda p: msgspec.structs.replace(p, ids=ids))
            built = build_prompt(tokenizer, text=job.prompt)
        else:
            match normalise(job.chat, 1, "chat"):
                case Success(sample):
                    built = build_prompt(tokenizer, messages=sample.messages, template=self.template)
                case Failure(error):
                    return Failure(error.message)
        return built.bind(lambda p: Success(p) if p.ids else Failure("the prompt is empty"))

    def _fit(self, prompt_tokens: int, options: Options) -> int:
        """max_tokens, checked against the model's context (a default shrinks to fit)."""
        context = self.engine.context
        if not context or prompt_tokens + options.max_tokens <= context:
            return options.max_tokens
        left = context - prompt_tokens
        if options.max_given or left < 1:
            raise bad_request(
                f"This model's maximum context length is {context} tokens; the prompt has "
                f"{prompt_tokens} and max_tokens asks for {options.max_tokens} more",
                "max_tokens" if left >= 1 else "messages", "context_length_exceeded")
        return left


def _unwrap(result: Result[Any, str], param: str) -> Any:
    match result:
        case Success(value):
            return value
        case Failure(message):
            raise bad_request(message, param)
    raise AssertionError("unreachable")


def load_adapter(engine: Engine, directory: str) -> Swap:
    """An adapter's layers (run on the worker thread), or a 400 with the loader's reason."""
    return _unwrap(engine.prepare(directory), "path")
