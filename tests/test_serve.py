"""`ft serve` answering the real `openai` client: a server started in a subprocess on a free
loopback port, the built-in `tiny` model and an adapter trained here for two steps."""

from __future__ import annotations

import io
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import httpx
import openai
import pytest
from cli_run import error_line, one_line_error, run_cli
from no_mlx import BLOCK_MLX

from finetune.cli import main

KEY = "sk-test-serve"
TIMEOUT = 60.0  # seconds any one request may take
START_S = 180.0  # seconds a server may take to load and listen
PROMPT = "SELECT name FROM"
CHAT = [{"role": "user", "content": "hi"}]


class Server:
    """`ft serve ...` in a subprocess: its URL once ready; always stopped by `stop`."""

    def __init__(self, args: list[str], home: Path, log: Path, without_mlx: bool = False):
        env = {**os.environ, "FINETUNE_HOME": str(home), "FT_BACKEND": "mlx"}
        env.pop("FT_API_KEY", None)
        self.log = log
        python = ["-c", f"{BLOCK_MLX}from finetune.cli import main\nsys.exit(main(sys.argv[1:]))"] if without_mlx \
            else ["-m", "finetune.cli"]
        self.proc = subprocess.Popen(
            [sys.executable, *python, "serve", *args, "--port", "0"],
            stdout=subprocess.PIPE, stderr=log.open("w"), text=True, env=env,
        )
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in self.proc.stdout], daemon=True).start()
        self.ready = ""
        deadline = time.monotonic() + START_S
        while not self.ready:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise AssertionError(f"ft serve did not start: {log.read_text()}") from None
            if line.startswith("ft serve: http"):
                self.ready = line.strip()
        self.url = re.search(r"(http://\S+/v1)", self.ready).group(1)

    def client(self, key: str | None = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=key or "none", timeout=TIMEOUT, max_retries=0)

    def http(self, method: str, path: str, key: str | None = KEY, **kwargs) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.request(method, self.url + path, headers=headers, **{"timeout": TIMEOUT, **kwargs})

    def health(self) -> dict:
        return httpx.get(self.url.removesuffix("/v1") + "/health", timeout=TIMEOUT).json()

    def stop(self, sig: int = signal.SIGINT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


@pytest.fixture(scope="module")
def home(finetune_home) -> Path:
    """The session's FineTune home (conftest): `tiny` is built once for this process and the servers."""
    return finetune_home


@pytest.fixture(scope="module")
def run(home, tmp_path_factory) -> Path:
    """An adapter on `tiny` trained for two steps (it changes the greedy text)."""
    out = tmp_path_factory.mktemp("serve") / "run"
    env = {**os.environ, "FINETUNE_HOME": str(home), "FT_BACKEND": "mlx"}
    done = subprocess.run(
        [sys.executable, "-m", "finetune.cli", "train", "start", "tiny", "sql", "--iters", "2",
         "--batch-size", "1", "--learning-rate", "1e-2", "--output", str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def server(home, run, tmp_path_factory) -> Iterator[Server]:
    s = Server(["tiny", "--adapter", f"sql={run}", "--api-key", KEY], home,
               tmp_path_factory.mktemp("serve-log") / "stderr.txt")
    yield s
    s.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def expected(home, run) -> dict[tuple[str, str], str]:
    """What `ft generate tiny` prints (greedy, 16 tokens, MLX) for PROMPT and CHAT, without and
    with the adapter, keyed by (model name, "prompt" or "chat")."""
    out = {}
    for model, extra in (("tiny", []), ("sql", ["--adapter", str(run)])):
        for kind, given in (("prompt", ["--prompt", PROMPT]), ("chat", ["--messages", json.dumps(CHAT)])):
            printed, errors = io.StringIO(), io.StringIO()
            with pytest.MonkeyPatch.context() as mp, redirect_stdout(printed), redirect_stderr(errors):
                mp.setenv("FINETUNE_HOME", str(home))
                code = main(["generate", "tiny", *given, "--max-tokens", "16", "--backend", "mlx", *extra])
            assert code == 0, errors.getvalue()
            out[model, kind] = printed.getvalue().removesuffix("\n")
    assert out["tiny", "prompt"] != out["sql", "prompt"] and out["tiny", "chat"] != out["sql", "chat"]
    return out


def test_greedy_text_equals_ft_generate_with_and_without_the_adapter(server, expected):
    client = server.client()
    for model in ("tiny", "sql"):  # the adapter is picked by the model name alone
        text = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0)
        assert text.choices[0].text == expected[model, "prompt"]
        chat = client.chat.completions.create(model=model, messages=CHAT, max_tokens=16, temperature=0)
        assert chat.choices[0].message.content == expected[model, "chat"]
        assert chat.choices[0].message.role == "assistant" and chat.object == "chat.completion"


def test_usage_and_finish_reasons(server):
    from finetune.files.tiny import ensure_tiny
    from finetune.files.tokenizer import load_tokenizer
    from finetune.shell.generation import build_prompt

    client = server.client()
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0)
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (5, 3, 8)
    ids = build_prompt(load_tokenizer(ensure_tiny()), text=PROMPT).unwrap().ids  # the same prompt as ids
    assert len(ids) == 5
    by_ids = client.completions.create(model="tiny", prompt=list(ids), max_tokens=3, temperature=0)
    assert by_ids.choices[0].text == out.choices[0].text
    longer = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0).choices[0].text
    word = longer.split()[1]  # a stop string cuts the text before it and finishes with "stop"
    cut = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, stop=[word, "zzz"])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == longer[: longer.index(word, 1)]
    ended = client.chat.completions.create(model="sql", messages=[{"role": "user", "content": PROMPT}],
                                           max_tokens=200, temperature=0)
    assert ended.choices[0].finish_reason in ("stop", "length")
    assert ended.usage.completion_tokens <= 200


def test_seeded_sampling_repeats_and_differs_by_seed(server):
    client = server.client()

    def sample(seed: int) -> str:
        return client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=1.5,
                                         top_p=0.95, seed=seed).choices[0].text

    assert sample(3) == sample(3)
    assert len({sample(s) for s in (3, 4, 5)}) > 1


def test_streams_join_to_the_whole_answer(server):
    client = server.client()
    for model in ("tiny", "sql"):
        whole = client.chat.completions.create(model=model, messages=CHAT, max_tokens=12, temperature=0)
        chunks = list(client.chat.completions.create(model=model, messages=CHAT, max_tokens=12, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
        assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"
        text = client.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0)
        pieces = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0, stream=True))
        assert len(pieces) > 2 and "".join(p.choices[0].text for p in pieces) == text.choices[0].text
        assert pieces[-1].choices[0].finish_reason == text.choices[0].finish_reason
    raw = server.http("POST", "/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 2, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip("\n").endswith("data: [DONE]")


def test_models_lists_the_base_and_every_adapter(server, run):
    client = server.client()
    listed = {m.id: m for m in client.models.list()}
    assert set(listed) >= {"tiny", "sql"} and listed["sql"].object == "model"
    assert client.models.retrieve("sql").id == "sql"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    assert server.http("GET", "/models").json()["data"][1]["root"] == str(run.resolve())


def test_adapters_are_added_and_removed_while_serving(server, run, tmp_path):
    from lora_models import random_adapter

    from finetune.files.tiny import ensure_tiny

    client = server.client()
    before = client.completions.create(model="sql", prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    added = server.http("POST", "/adapters", json={"name": "again", "path": str(run)})
    assert added.status_code == 201 and added.json()["id"] == "again"
    assert client.completions.create(model="again", prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text == before
    other = random_adapter(ensure_tiny(), tmp_path / "random", b_std=4.0, num_layers=2, keys=("self_attn.v_proj",))
    assert server.http("POST", "/adapters", json={"name": "random", "path": str(other)}).status_code == 201
    swapped = client.completions.create(model="random", prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    assert swapped != before
    # Each request sees its own adapter, and the base stays bare between them.
    base = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    assert base not in (before, swapped)
    assert client.completions.create(model="sql", prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text == before
    gone = server.http("DELETE", "/adapters/again")
    assert gone.status_code == 200 and gone.json() == {"id": "again", "object": "model", "deleted": True}
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="again", prompt=PROMPT, max_tokens=2)
    assert err.value.body["code"] == "model_not_found"
    assert "again" not in {m.id for m in client.models.list()}
    assert server.http("DELETE", "/adapters/again").status_code == 404
    assert server.http("DELETE", "/adapters/tiny").status_code == 400
    assert server.http("POST", "/adapters", json={"name": "sql", "path": str(run)}).status_code == 409


def test_adapters_that_do_not_fit_are_refused_with_the_reason(server, model_dir, tmp_path):
    from lora_models import random_adapter

    other_base = random_adapter(model_dir, tmp_path / "other")  # hidden 64, tiny has 256
    for body, status, words in (
        ({"name": "x", "path": str(other_base)}, 400, "the model needs"),
        ({"name": "x", "path": str(tmp_path / "missing")}, 400, "no such adapter directory"),
        ({"name": "x", "path": str(tmp_path)}, 400, "not an adapter directory"),
        ({"name": "a b", "path": str(other_base)}, 400, "adapter name"),
        ({"name": "x"}, 400, "path"),
    ):
        answer = server.http("POST", "/adapters", json=body)
        error = answer.json()["error"]
        assert answer.status_code == status and words in error["message"], error
        assert set(error) == {"message", "type", "param", "code"}
    assert "x" not in {m.id for m in server.client().models.list()}


def test_bad_requests_get_openai_errors(server):
    client = server.client()
    cases = [
        (lambda: client.chat.completions.create(model="nope", messages=CHAT), openai.NotFoundError, "model"),
        (lambda: client.chat.completions.create(model="tiny", messages=[]), openai.BadRequestError, "messages"),
        (lambda: client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=-1), openai.BadRequestError, "max_tokens"),
        (lambda: client.chat.completions.create(model="tiny", messages=CHAT, n=2), openai.BadRequestError, "n"),
        (lambda: client.chat.completions.create(model="tiny", messages=CHAT, temperature=3), openai.BadRequestError, "temperature"),
        (lambda: client.chat.completions.create(model="tiny", messages=CHAT, logprobs=True), openai.BadRequestError, "logprobs"),
        (lambda: client.chat.completions.create(model="tiny", messages=[{"role": "tool", "content": "x"}]), openai.BadRequestError, "messages"),
        (lambda: client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5000), openai.BadRequestError, "max_tokens"),
        (lambda: client.completions.create(model="tiny", prompt=["a", "b"]), openai.BadRequestError, "prompt"),
        (lambda: client.completions.create(model="tiny", prompt=[]), openai.BadRequestError, "prompt"),
        (lambda: client.completions.create(model="tiny", prompt=[99999]), openai.BadRequestError, "prompt"),
    ]
    for i, (call, exception, param) in enumerate(cases):
        with pytest.raises(exception) as err:
            call()
            pytest.fail(f"case {i} was answered")
        assert err.value.body["param"] == param and err.value.body["message"], err.value.body
    for body in (b"{bad", b"", b"[]", b'{"model": "tiny"}', b'{"model": "tiny", "messages": CHAT}'):
        answer = server.http("POST", "/chat/completions", content=body)
        assert answer.status_code == 400 and set(answer.json()["error"]) == {"message", "type", "param", "code"}
    missing = server.http("POST", "/chat/completions", json={"model": "tiny"}).json()["error"]
    assert missing["param"] == "messages" and missing["type"] == "invalid_request_error"
    assert server.http("GET", "/nowhere").status_code == 404
    assert server.http("GET", "/chat/completions").status_code == 405
    # Harmless fields OpenAI clients send are accepted.
    fine = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2, temperature=0, user="u",
                                          presence_penalty=0, extra_body={"unknown_field": 1},
                                          response_format={"type": "text"})
    assert fine.usage.completion_tokens >= 1


def test_api_key_is_required_except_for_health(server):
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()
    assert server.http("GET", "/models", key=None).status_code == 401
    assert server.http("GET", "/models", key=None).json()["error"]["code"] == "invalid_api_key"
    assert server.health()["status"] == "ok"


def test_concurrent_requests_are_all_answered_correctly(server):
    client = server.client()
    asks = [("tiny", PROMPT), ("sql", PROMPT), ("tiny", "SELECT age"), ("sql", "hello world")] * 2
    expected = {a: client.completions.create(model=a[0], prompt=a[1], max_tokens=10, temperature=0).choices[0].text
                for a in set(asks)}
    answers: dict[int, str] = {}

    def ask(i: int) -> None:
        model, prompt = asks[i]
        answers[i] = client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=TIMEOUT * 2)
    assert answers == {i: expected[a] for i, a in enumerate(asks)}


def test_a_client_leaving_mid_stream_stops_its_generation(server):
    before = server.health()["generated_tokens"]
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 1500, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/completions", json=body, timeout=TIMEOUT,
                      headers={"Authorization": f"Bearer {KEY}"}) as answer:
        lines = answer.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    # The next request is answered correctly, and the one left behind stopped early.
    text = server.client().completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0)
    assert text.choices[0].finish_reason == "length" and text.usage.completion_tokens == 4
    health = server.health()
    assert health["queued"] == 0 and health["generated_tokens"] - before < 1000, health
    # A client that gives up on a whole (non-streamed) answer stops its generation too.
    with pytest.raises(httpx.ReadTimeout):
        server.http("POST", "/completions", json={**body, "stream": False}, timeout=httpx.Timeout(TIMEOUT, read=1.0))
    text = server.client().completions.create(model="sql", prompt=PROMPT, max_tokens=4, temperature=0)
    assert text.usage.completion_tokens <= 4
    assert server.health()["generated_tokens"] - health["generated_tokens"] < 1000


def test_ctrl_c_stops_the_server_cleanly(server):
    code = server.stop(signal.SIGINT)
    err = server.log.read_text()
    assert code == 0, err
    assert "ft serve: stopped" in err and "Traceback" not in err


def test_torch_engine_serves_the_same_text(home, run, expected, tmp_path):
    """On a machine without MLX too: the server hides it from itself."""
    s = Server(["tiny", "--backend", "torch", "--adapter", f"sql={run}"], home, tmp_path / "torch.txt", without_mlx=True)
    try:
        assert "(torch)" in s.ready
        client = s.client(key=None)
        for model in ("tiny", "sql"):
            chat = client.chat.completions.create(model=model, messages=CHAT, max_tokens=16, temperature=0)
            assert chat.choices[0].message.content == expected[model, "chat"]
            streamed = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0, stream=True)
            assert "".join(p.choices[0].text for p in streamed) == expected[model, "prompt"]
        assert s.http("POST", "/adapters", json={"name": "b", "path": str(run)}, key=None).status_code == 201
        assert client.completions.create(model="b", prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text == \
            expected["sql", "prompt"]
        assert s.stop() == 0
    finally:
        s.stop(signal.SIGKILL)


@pytest.mark.parametrize(("args", "words"), [
    (["tiny", "--adapter", "noequals"], "expected NAME=RUN"),
    (["tiny", "--adapter", "a=/nonexistent/run"], "no such directory"),
    (["tiny", "--adapter", "a b=."], "adapter name"),
    (["tiny", "--api-key", " "], "--api-key is empty"),
    (["tiny", "--host", "no.such.host.invalid"], "--host no.such.host.invalid: cannot resolve"),
    (["/nonexistent/model"], "no such model directory"),
])
def test_cli_bad_flags_are_one_line_and_exit_2(args, words, capsys):
    code, _, err = run_cli(capsys, "serve", *args)
    assert code == 2 and words in error_line(err)  # a model that fails to load follows the backend line


def test_cli_busy_port_is_one_line_and_exit_2(capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        code, _, err = run_cli(capsys, "serve", "tiny", "--port", str(taken.getsockname()[1]))
    assert code == 2 and "cannot listen" in one_line_error(err)


def test_cli_without_the_serve_extra_says_how_to_install(tmp_path):
    hide = BLOCK_MLX.replace("('mlx', 'mlx_lm')", "('starlette', 'uvicorn')")
    code = hide + "import sys\nfrom finetune.cli import main\nsys.exit(main(['serve', 'tiny']))\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "FINETUNE_HOME": str(tmp_path)})
    assert done.returncode == 2 and "pip install" in one_line_error(done.stderr)
