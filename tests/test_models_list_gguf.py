"""`ft models list` shows the conversions of .gguf files used as MODEL, named by their file, with
their size, architecture and the file's own tensor type; a changed or deleted file marks its stale."""

from __future__ import annotations

import json
import os

from cli_run import run_cli
from gguf_files import build_model, write_gguf

from finetune.files.gguf import cache_dir
from finetune.files.sources import model_dir
from finetune.files.tokenizer import load_tokenizer
from finetune.shell.models.inventory import dir_size


def _gguf_rows(capsys) -> list[dict]:
    code, out, err = run_cli(capsys, "models", "list", "--json")
    assert code == 0, err
    return [r for r in json.loads(out) if r["kind"] == "gguf"]


def test_converted_gguf_files_are_listed_by_their_file(offline_home, tmp_path, tokenizer_dir, capsys):
    model = build_model("llama", len(load_tokenizer(tokenizer_dir)))
    path = write_gguf(model, tokenizer_dir, tmp_path / "small.Q8_0.gguf", "Q8_0")
    assert _gguf_rows(capsys) == []
    converted = model_dir(str(path)).unwrap()
    assert converted == cache_dir(path)
    (converted.parent / ".small.Q8_0-half-written").mkdir()  # an unfinished conversion is not listed
    [row] = _gguf_rows(capsys)
    assert row == {"name": str(path.resolve()), "architecture": "llama", "parameters": row["parameters"],
                   "dtype": "float32", "size": dir_size(converted), "kind": "gguf", "where": str(converted),
                   "note": f"from a {path.stat().st_size / 1e6:.1f} MB Q8_0 GGUF file"}
    assert row["parameters"] == sum(p.numel() for p in model.parameters())
    code, out, _ = run_cli(capsys, "models", "list")
    assert code == 0 and f"{path.resolve()} (gguf): {converted}" in " ".join(out.split())
    os.utime(path, ns=(1, 1))  # changed: the next use converts it again, this entry is stale
    assert "stale: the file changed or is gone" in _gguf_rows(capsys)[0]["note"]
    path.unlink()
    assert "stale" in _gguf_rows(capsys)[0]["note"]
