"""GGUF export checked by llama.cpp itself (llama-cpp-python): fused models at F32/F16 give FineTune's
logits, Q8_0 its greedy continuations, base + LoRA GGUF the fused export's; tied heads stay tied;
the Ollama Modelfile; bad export targets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
from lora_models import (
    ROWS,
    bases_with_adapters,
    build_hf,
    make_tokenizer,
    mlx_logits,
    ours,
    random_adapter,
    run_cli,
    write_model,
)

from finetune.files.datasets import bundled_root
from finetune.files.tokenizer import load_tokenizer
from finetune.shell.export import ollama

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'finetune-lora[test]')")

VARIANTS = ("llama-tied", "llama", "qwen2-tied")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "bpe")


@pytest.fixture(scope="module")
def bases(tmp_path_factory, tok):
    """Each variant's float32 base and an all-linear adapter with random lora_b (rank 4, scale 2)."""
    return bases_with_adapters(tmp_path_factory.mktemp("gguf"), tok, VARIANTS)


@pytest.fixture(scope="module")
def prompts(tok) -> list[list[int]]:
    """Token ids of the first bundled SQL test prompts."""
    tokenizer = load_tokenizer(tok[0])
    rows = (bundled_root() / "sql" / "test.jsonl").read_text().splitlines()[:3]
    return [tokenizer(json.loads(r)["prompt"])["input_ids"] for r in rows]


def load(path: Path, lora: Path | None = None):
    """The file in llama.cpp, its KV cache in F32 (its default F16 cache alone moves logits ~5e-3)."""
    kwargs = {"lora_path": str(lora)} if lora else {}
    return llama_cpp.Llama(str(path), n_ctx=256, logits_all=True, n_threads=2, verbose=False,
                           type_k=0, type_v=0, **kwargs)  # 0: GGML_TYPE_F32


def cpp_logits(llm, rows=ROWS) -> list[np.ndarray]:
    out = []
    for row in rows:
        llm.reset()
        llm.eval(list(row))
        out.append(np.array(llm.scores[: len(row)], dtype=np.float32))
    return out


def cpp_greedy(llm, prompt: list[int], n: int = 12) -> list[int]:
    llm.reset()
    llm.eval(list(prompt))
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def ours_greedy(model, prompt: list[int], n: int = 12) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(np.argmax(mlx_logits(model, [ids])[0][-1])))
    return ids[len(prompt):]


def export(capsys, tmp_path, bases, variant, gguf_type, *extra) -> Path:
    base, adapter = bases[variant]
    out = tmp_path / f"{variant}-{gguf_type}.gguf"
    code, stdout, err = run_cli(capsys, "fuse", base, "--adapter", adapter, "--format", "gguf",
                                "--gguf-type", gguf_type, "--output", out, *extra)
    assert code == 0, err
    assert f"GGUF {'qwen2' if variant.startswith('qwen2') else 'llama'}, {gguf_type.upper()}" in stdout
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left
    return out


def tensor_types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def fields(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    small = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")
    return {k: (len(f.data) if k in small else f.contents()) for k, f in reader.fields.items()}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("gguf_type", "tolerance"), [("f32", 1e-4), ("f16", 1e-2)])
def test_fused_gguf_gives_finetunes_logits_in_llama_cpp(tmp_path, capsys, bases, variant, gguf_type, tolerance):
    out = export(capsys, tmp_path, bases, variant, gguf_type)
    expected = mlx_logits(ours(*bases[variant]))  # FineTune: the base with the adapter attached
    got = cpp_logits(load(out))
    for e, g in zip(expected, got, strict=True):
        assert g.shape == e.shape
        assert float(np.abs(g - e).max()) <= tolerance, float(np.abs(g - e).max())
        # argmax equal wherever FineTune's top two differ by more than the tolerance either way
        # (F32: everywhere; at F16 a tie within 2e-4 on random weights may go either way)
        top2 = np.sort(e, -1)[:, -2:]
        decided = top2[:, 1] - top2[:, 0] > (2 * tolerance if gguf_type == "f16" else 0)
        assert decided.mean() > 0.8
        assert (g.argmax(-1) == e.argmax(-1))[decided].all()
    types = tensor_types(out)
    assert types["blk.0.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
    assert types["blk.0.attn_q.weight"] == gguf_type.upper()
    assert ("output.weight" in types) == (variant == "llama")  # tied heads stay tied


@pytest.mark.parametrize("variant", ["llama3", "llama-linear", "llama-bias"])
def test_rope_scaling_and_biases_survive_the_export(tmp_path, capsys, tok, variant):
    """Llama 3 rope (llama.cpp's rope_freqs tensor), linear rope scaling, biases with head_dim 24."""
    base = write_model(build_hf(variant, tok[1]), tmp_path / variant, tok[0])
    variants = {variant: (base, random_adapter(base, tmp_path / "adapter"))}
    out = export(capsys, tmp_path, variants, variant, "f32")
    expected, got = mlx_logits(ours(*variants[variant])), cpp_logits(load(out))
    assert max(float(np.abs(g - e).max()) for g, e in zip(got, expected, strict=True)) <= 1e-4
    assert ("rope_freqs.weight" in tensor_types(out)) == (variant == "llama3")


@pytest.fixture(scope="module")
def decisive(tmp_path_factory, tok):
    """The untied llama with decisive next-token choices, as a trained model's are: large embeddings
    and a head that maps each token to a fixed successor (random weights alone leave top-two ties
    within Q8_0's rounding: its logits move by ~0.2 of ~4 there), plus a random adapter."""
    import torch

    model = build_hf("llama", tok[1])
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        embed.mul_(20.0)
        successor = torch.randperm(tok[1], generator=torch.Generator().manual_seed(3))
        model.lm_head.weight.copy_(embed[successor] / 20.0)
    root = tmp_path_factory.mktemp("decisive")
    d = write_model(model, root / "llama", tok[0])
    return {"llama": (d, random_adapter(d, root / "adapter"))}


def test_q8_0_gives_the_same_greedy_continuations_on_bundled_prompts(tmp_path, capsys, decisive, prompts):
    out = export(capsys, tmp_path, decisive, "llama", "q8_0")
    assert tensor_types(out)["blk.1.ffn_down.weight"] == "Q8_0"
    model, llm = ours(*decisive["llama"]), load(out)
    for prompt in prompts:
        continuation = ours_greedy(model, prompt)
        assert cpp_greedy(llm, prompt) == continuation
        assert len(set(continuation)) > 3  # not one token repeated


def test_q4_0_and_bf16_load_in_llama_cpp(tmp_path, capsys, bases):
    for gguf_type, block in (("q4_0", "Q4_0"), ("bf16", "BF16")):
        out = export(capsys, tmp_path, bases, "llama-tied", gguf_type)
        types = tensor_types(out)
        assert types["blk.0.attn_q.weight"] == block and types["blk.0.ffn_norm.weight"] == "F32"
        assert types["token_embd.weight"] == ("Q8_0" if gguf_type == "q4_0" else "BF16")  # embeddings kept at 8 bits
        logits = cpp_logits(load(out), ROWS[:1])[0]
        assert np.isfinite(logits).all() and logits.std() > 0.1


def test_base_plus_adapter_gguf_equals_the_fused_export(tmp_path, capsys, bases, prompts):
    base, adapter = bases["llama-tied"]
    fused = export(capsys, tmp_path, bases, "llama-tied", "f32")
    code, stdout, err = run_cli(capsys, "export", base, "--format", "gguf", "--output", tmp_path / "base.gguf")
    assert code == 0, err
    code, stdout, err = run_cli(capsys, "export", adapter, "--format", "gguf-adapter", "--output", tmp_path / "lora.gguf")
    assert code == 0, err
    assert "14 pairs, rank 4, alpha 8" in stdout
    meta = fields(tmp_path / "lora.gguf")
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["adapter.lora.alpha"] == pytest.approx(8.0) and meta["general.architecture"] == "llama"
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in gguf.GGUFReader(tmp_path / "lora.gguf").tensors}
    assert shapes["blk.0.attn_k.weight.lora_a"] == (64, 4) and shapes["blk.0.attn_k.weight.lora_b"] == (4, 32)  # ggml ne order

    with_lora, merged = load(tmp_path / "base.gguf", tmp_path / "lora.gguf"), load(fused)
    plain = cpp_logits(load(tmp_path / "base.gguf"))
    diff = max(float(np.abs(a - b).max()) for a, b in zip(cpp_logits(with_lora), cpp_logits(merged), strict=True))
    moved = max(float(np.abs(a - b).max()) for a, b in zip(plain, cpp_logits(merged), strict=True))
    assert diff <= 1e-3 < 0.5 < moved  # the adapter matters, and llama.cpp applies it as fused
    for prompt in prompts:
        assert cpp_greedy(with_lora, prompt) == cpp_greedy(merged, prompt)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, bases, tok):
    """llama-tied quantized to 4 bits in mlx-lm's layout (as test_fuse builds it), with its adapter."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    source, adapter = bases["llama-tied"]
    model = ours(source)
    nn.quantize(model, group_size=32, bits=4)
    d = tmp_path_factory.mktemp("q") / "llama-4bit"
    d.mkdir()
    mx.save_safetensors(str(d / "model.safetensors"), dict(tree_flatten(model.parameters())), metadata={"format": "mlx"})
    config = json.loads((source / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "quantization": {"group_size": 32, "bits": 4}}))
    for f in tok[0].iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    return d, adapter


def test_a_quantized_mlx_base_exports_requantized_or_dequantized_and_says_which(tmp_path, capsys, quantized):
    d, adapter = quantized
    code, stdout, err = run_cli(capsys, "fuse", d, "--adapter", adapter, "--format", "gguf", "--output", tmp_path / "q.gguf")
    assert code == 0, err
    assert "MLX 4-bit (group 32) base dequantized, fused in float32 and re-quantized to Q4_0" in stdout
    assert tensor_types(tmp_path / "q.gguf")["blk.0.attn_v.weight"] == "Q4_0"
    code, stdout, err = run_cli(capsys, "fuse", d, "--adapter", adapter, "--format", "gguf", "--gguf-type", "f32",
                                "--output", tmp_path / "f.gguf")
    assert code == 0, err
    assert "MLX 4-bit (group 32) base dequantized to F32" in stdout
    expected = mlx_logits(ours(d, adapter))  # the QLoRA model: quantized base + adapter
    got = cpp_logits(load(tmp_path / "f.gguf"))
    assert max(float(np.abs(g - e).max()) for g, e in zip(got, expected, strict=True)) <= 1e-4


def test_a_base_read_from_gguf_exports_back_with_that_files_metadata(tmp_path, capsys, tok):
    from gguf_files import build_model, write_gguf

    from finetune.files.models import model_config

    source = write_gguf(build_model("llama-tied", tok[1]), tok[0], tmp_path / "src.gguf", qtype="Q8_0", name="tiny-src")
    directory, _ = model_config(str(source)).unwrap()
    adapter = random_adapter(directory, tmp_path / "adapter")
    code, stdout, err = run_cli(capsys, "fuse", source, "--adapter", adapter, "--format", "gguf", "--output", tmp_path / "q.gguf")
    assert code == 0, err
    assert "source GGUF's Q8_0 kept at Q8_0" in stdout and tensor_types(tmp_path / "q.gguf")["blk.0.attn_q.weight"] == "Q8_0"
    code, stdout, err = run_cli(capsys, "fuse", source, "--adapter", adapter, "--format", "gguf", "--gguf-type", "f32",
                                "--output", tmp_path / "f.gguf")
    assert code == 0, err
    assert "source GGUF's Q8_0 dequantized to F32" in stdout
    original, exported = gguf.GGUFReader(source).fields, gguf.GGUFReader(tmp_path / "f.gguf").fields
    assert exported["general.name"].contents() == "tiny-src"
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.chat_template"):
        assert exported[key].contents() == original[key].contents(), key
    expected = mlx_logits(ours(str(source), adapter))  # FineTune on the GGUF base with the adapter
    got = cpp_logits(load(tmp_path / "f.gguf"))
    assert max(float(np.abs(g - e).max()) for g, e in zip(got, expected, strict=True)) <= 1e-4


def test_tokenizer_and_chat_template_travel_in_the_file(tmp_path, capsys, bases, tok):
    out = export(capsys, tmp_path, bases, "llama-tied", "f16")
    meta = fields(out)
    tokenizer = load_tokenizer(tok[0])
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.tokens"] == tok[1] and meta["tokenizer.ggml.merges"] > 0
    assert meta["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert meta["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template
    llm = load(out)
    for text in ("SELECT name FROM users WHERE id = 42", "hello world 7; <|im_start|>user\nhi<|im_end|>\n"):
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tokenizer(text)["input_ids"]


def test_ollama_modelfiles(tmp_path, capsys, bases):
    base, adapter = bases["llama-tied"]
    code, stdout, err = run_cli(capsys, "export", adapter, "--format", "gguf-adapter", "--ollama",
                                "--output", tmp_path / "sql.gguf")
    assert code == 0, err
    text = (tmp_path / "Modelfile").read_text()
    assert text.splitlines()[:2] == ["FROM ./sql-base.gguf", "ADAPTER ./sql.gguf"]
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "</s>"' in text
    assert f"ollama create sql -f {tmp_path / 'Modelfile'}" in stdout
    assert (tmp_path / "sql-base.gguf").is_file()

    fused = tmp_path / "fused"
    fused.mkdir()
    code, stdout, err = run_cli(capsys, "export", adapter, "--format", "gguf", "--ollama", "--output", fused / "m.gguf")
    assert code == 0, err
    assert (fused / "Modelfile").read_text().splitlines()[0] == "FROM ./m.gguf"
    assert "ADAPTER" not in (fused / "Modelfile").read_text()


def test_chat_templates_translated_for_ollama():
    llama3 = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
              "{{ m['content'] }}<|eot_id|>{% endfor %}")
    t = ollama.translate(llama3)
    assert t.kind == "llama3" and "<|eot_id|>" in t.stops and "{{ .Content }}<|eot_id|>" in t.template
    smol = "{{ '<|im_start|>system\\nYou are SmolLM.<|im_end|>\\n' }}{{ '<|im_start|>' + m['role'] }}"
    assert ollama.translate(smol).system == "You are SmolLM."
    other = ollama.translate("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}{% endfor %}")
    assert other.kind == "" and "TEMPLATE" not in ollama.modelfile("./m.gguf", "", other, "</s>")


def test_bad_export_targets_exit_2_in_one_line_and_write_nothing(tmp_path, capsys, bases, tok):
    from cli_run import one_line_error

    base, adapter = bases["llama-tied"]
    (tmp_path / "dir.gguf").mkdir()
    (tmp_path / "exists.gguf").write_bytes(b"keep")
    (tmp_path / "afile").write_text("x")
    gpt2 = write_model(build_hf("gpt2", tok[1]), tmp_path / "gpt2", tok[0])
    cases = [
        (("fuse", base, "--adapter", adapter, "--format", "gguf", "--output", tmp_path / "dir.gguf"), "is a directory"),
        (("export", adapter, "--format", "gguf", "--output", tmp_path / "exists.gguf"), "already exists; pass --force"),
        (("export", adapter, "--format", "gguf", "--output", tmp_path / "afile" / "x.gguf"), "afile: is a file, not a folder"),
        (("fuse", base, "--adapter", adapter, "--format", "gguf", "--gguf-type", "q5_k", "--output", tmp_path / "a.gguf"),
         "--gguf-type q5_k: not supported"),
        (("export", adapter, "--format", "gguf-adapter", "--gguf-type", "q8_0", "--output", tmp_path / "a.gguf"),
         "written as f32 or f16"),
        (("export", gpt2, "--format", "gguf", "--output", tmp_path / "a.gguf"), "model_type 'gpt2' has no GGUF mapping"),
        (("export", base, "--format", "gguf-adapter", "--output", tmp_path / "a.gguf"), "a model with no LoRA adapter"),
        (("fuse", base, "--adapter", adapter, "--dtype", "float16", "--format", "gguf", "--output", tmp_path / "a.gguf"),
         "--dtype applies to --format hf"),
    ]
    for argv, message in cases:
        code, _, err = run_cli(capsys, *argv)
        assert code == 2, (argv, err)
        assert message in one_line_error(err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "dir.gguf", "exists.gguf", "gpt2"]
    assert (tmp_path / "exists.gguf").read_bytes() == b"keep" and not any((tmp_path / "dir.gguf").iterdir())


def test_export_peft_delegates_to_the_adapter_export(tmp_path, capsys, bases):
    _, adapter = bases["llama-tied"]
    code, stdout, err = run_cli(capsys, "export", adapter, "--format", "peft", "--output", tmp_path / "peft")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    code, stdout, err = run_cli(capsys, "adapters", "export", adapter, "--format", "gguf-adapter", "--output", tmp_path / "a.gguf")
    assert code == 0, err
    assert fields(tmp_path / "a.gguf")["adapter.type"] == "lora"


@pytest.mark.skipif(not os.environ.get("FT_REAL_MODEL"), reason="opt-in: FT_REAL_MODEL=/path/to/model.gguf")
def test_real_gguf_exports_to_llama_cpp(tmp_path, capsys):
    """A real llama.cpp file (e.g. SmolLM2-135M-Instruct.Q4_1.gguf) with a small random adapter:
    the F32 export gives FineTune's logits in llama.cpp, base + LoRA GGUF the fused greedy text."""
    from finetune.files.models import model_config

    source = os.environ["FT_REAL_MODEL"]
    directory, _ = model_config(source).unwrap()
    adapter = random_adapter(directory, tmp_path / "adapter", rank=8, b_std=0.002)
    tokenizer = load_tokenizer(directory)
    rows = (bundled_root() / "sql" / "test.jsonl").read_text().splitlines()[:3]
    ids = [tokenizer(json.loads(r)["prompt"])["input_ids"] for r in rows]
    for argv in (("fuse", source, "--adapter", adapter, "--format", "gguf", "--gguf-type", "f32", "--output", tmp_path / "f.gguf"),
                 ("export", source, "--format", "gguf", "--gguf-type", "f32", "--output", tmp_path / "base.gguf"),
                 ("export", adapter, "--format", "gguf-adapter", "--output", tmp_path / "lora.gguf")):
        code, _, err = run_cli(capsys, *argv)
        assert code == 0, err
    fused = load(tmp_path / "f.gguf")
    for e, g in zip(mlx_logits(ours(source, adapter), ids), cpp_logits(fused, ids), strict=True):
        assert float(np.abs(g - e).max()) <= 1e-3 and (g.argmax(-1) == e.argmax(-1)).all()
    with_lora = load(tmp_path / "base.gguf", tmp_path / "lora.gguf")
    for prompt in ids:
        assert cpp_greedy(with_lora, prompt) == cpp_greedy(fused, prompt)
