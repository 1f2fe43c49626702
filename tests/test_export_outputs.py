"""Every file `ft export`, `ft fuse`, `ft adapters` and `ft eval --out` write: a missing folder is
created, the file appears whole (no temporary leftovers), and a file standing where a folder must
be is refused in one line (exit 2) before anything is read or written."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_run import one_line_error, run_cli
from lora_models import bases_with_adapters, make_tokenizer


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    tok = make_tokenizer(tmp_path_factory.mktemp("tok") / "bpe")
    return bases_with_adapters(tmp_path_factory.mktemp("bases"), tok, ("llama-tied",))["llama-tied"]


WHAT = ("fused hf", "fused gguf + Modelfile", "export gguf", "adapter gguf + base + Modelfile", "peft",
        "adapters export", "predictions")


def _commands(base: Path, adapter: Path, out: Path) -> dict[str, tuple]:
    """Each command writing into `out` (a folder that may not exist), by what it writes."""
    return {
        "fused hf": ("fuse", base, "--adapter", adapter, "--output", out / "fused"),
        "fused gguf + Modelfile": ("fuse", base, "--adapter", adapter, "--format", "gguf", "--output",
                                   out / "fused.gguf", "--ollama"),
        "export gguf": ("export", adapter, "--model", base, "--format", "gguf", "--output", out / "export.gguf"),
        "adapter gguf + base + Modelfile": ("export", adapter, "--model", base, "--format", "gguf-adapter",
                                            "--output", out / "lora.gguf", "--ollama"),
        "peft": ("export", adapter, "--format", "peft", "--output", out / "peft"),
        "adapters export": ("adapters", "export", adapter, "--format", "peft", "--output", out / "back"),
        "predictions": ("eval", base, "sql", "--limit", "1", "--max-tokens", "2", "--out", out / "p.jsonl"),
    }


def test_missing_folders_are_created_and_files_appear_whole(pair, tmp_path, capsys):
    base, adapter = pair
    wrote = {}
    for what in WHAT:
        out = tmp_path / "new" / what.replace(" ", "-") / "deeper"
        code, _, err = run_cli(capsys, *_commands(base, adapter, out)[what])
        assert code == 0, (what, err)
        wrote[what] = sorted(p.name for p in out.iterdir())
    assert wrote == {
        "fused hf": ["fused"], "fused gguf + Modelfile": ["Modelfile", "fused.gguf"], "export gguf": ["export.gguf"],
        "adapter gguf + base + Modelfile": ["Modelfile", "lora-base.gguf", "lora.gguf"], "peft": ["peft"],
        "adapters export": ["back"], "predictions": ["p.jsonl"],
    }
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary file or folder left behind


@pytest.mark.parametrize("what", WHAT)
def test_a_file_where_a_folder_must_be_is_one_line_exit_2(pair, tmp_path, capsys, what):
    base, adapter = pair
    (tmp_path / "afile").write_text("x")
    argv = _commands(base, adapter, tmp_path / "afile" / "sub")[what]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2, err
    flag = "--out" if what == "predictions" else "--output"
    target = argv[argv.index(flag) + 1]
    assert one_line_error(err) == f"ft: error: {tmp_path / 'afile'}: is a file, not a folder; {flag} {target} needs a folder there"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"] and (tmp_path / "afile").read_text() == "x"
