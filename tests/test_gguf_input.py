"""A llama.cpp `.gguf` file as MODEL: logits and tokenizer equal to transformers' own GGUF loading,
every dequantized type, the cache, the CLI on both engines, and one-line refusals of broken files."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from cli_run import error_line, run_cli
from gguf_files import build_model, build_other, write_gguf
from transformers import AutoModelForCausalLM, AutoTokenizer

import finetune
from finetune.errors import UserError
from finetune.files.gguf import cache_dir
from finetune.files.sources import model_dir
from finetune.files.tokenizer import load_tokenizer

IDS = np.array([[0, 5, 17, 99, 3, 250, 7, 8, 9, 10, 11, 12, 301, 44]], np.int64)
WIDE = dict(hidden_size=256, intermediate_size=256, head_dim=64)  # K-quant blocks hold 256 values
ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def vocab(tokenizer_dir) -> int:
    return len(load_tokenizer(tokenizer_dir))


@pytest.fixture(scope="module")
def make(tmp_path_factory, tokenizer_dir, vocab):
    """`make(variant, qtype, **write_options)` -> (path of a GGUF file, the source HF model)."""
    root = tmp_path_factory.mktemp("gguf")
    made: dict = {}

    def _make(variant: str, qtype: str = "F32", wide: bool = False, **options) -> tuple[Path, object]:
        key = (variant, qtype, wide, tuple(sorted((k, str(v)) for k, v in options.items())))
        if key not in made:
            model = build_model(variant, vocab, **(WIDE if wide else {}))
            folder = root / f"{variant}-{qtype}-{len(made)}"
            folder.mkdir()
            made[key] = (write_gguf(model, tokenizer_dir, folder / "model.gguf", qtype, **options), model)
        return made[key]

    return _make


def transformers_logits(path: Path) -> np.ndarray:
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        return ref.eval()(torch.from_numpy(IDS)).logits.numpy()


def mlx_logits(spec: str) -> np.ndarray:
    model, _ = finetune.load(spec)
    return np.array(model(mx.array(IDS.astype(np.int32))), np.float32)


def torch_engine_logits(spec: str, ids: np.ndarray = IDS) -> np.ndarray:
    from finetune.engines.torch.load import load_base

    lm = load_base(model_dir(spec).unwrap(), torch.float32, spec).unwrap()
    with torch.no_grad():
        return lm(torch.from_numpy(ids)).logits.float().numpy()


CASES = [("llama", "F32", False), ("llama-tied", "F16", False), ("mistral", "BF16", False),
         ("qwen2", "Q8_0", False), ("qwen2-tied", "Q4_0", False), ("llama", "Q4_1", False),
         ("llama", "Q4_K", True), ("llama-tied", "Q5_K", True), ("qwen2", "Q6_K", True)]


@pytest.mark.parametrize(("variant", "qtype", "wide"), CASES, ids=[f"{v}-{q}" for v, q, _ in CASES])
def test_both_engines_match_transformers_gguf_loading(make, variant, qtype, wide):
    path, _ = make(variant, qtype, wide)
    reference = transformers_logits(path)
    assert np.abs(reference).max() > 1.0  # order-one logits: a wrong row order would show
    assert np.abs(mlx_logits(str(path)) - reference).max() < 1e-4
    assert np.abs(torch_engine_logits(str(path)) - reference).max() < 1e-4


@pytest.mark.parametrize("variant", ["llama3", "llama-linear", "llama-bias"])
def test_rope_scaling_and_biases_match_the_source_model(make, variant):
    """transformers' GGUF loader drops these (rope_freqs, rope.scaling.*, attention biases); we keep
    them, so the reference is the HF model the F32 file was written from."""
    path, source = make(variant, "F32")
    with torch.no_grad():
        reference = source(torch.from_numpy(IDS)).logits.numpy()
    assert np.abs(mlx_logits(str(path)) - reference).max() < 1e-4
    assert np.abs(torch_engine_logits(str(path)) - reference).max() < 1e-4


@pytest.mark.parametrize("model_type", ["qwen3", "gemma2", "gemma3_text", "phi3", "olmo2"])
def test_other_architectures_match_the_source_model(tmp_path, tokenizer_dir, vocab, model_type):
    """Q/K norms, Gemma's stored `1 +` gains, sliding windows, soft-capping, Phi-3's fused and partly
    rotated projections. transformers' GGUF loader refuses or misreads these tiny files (olmo2 is not
    supported, phi3's partial rotary is lost), so the reference is the HF model the file was written from."""
    from finetune.core.architectures import SUPPORTED

    source = build_other(model_type, vocab)
    path = write_gguf(source, tokenizer_dir, tmp_path / f"{model_type}.gguf")
    with torch.no_grad():
        reference = source(torch.from_numpy(IDS)).logits.numpy()
    assert np.abs(torch_engine_logits(str(path)) - reference).max() < 1e-4
    if model_type in SUPPORTED:  # the MLX engine's registry
        assert np.abs(mlx_logits(str(path)) - reference).max() < 1e-4


def _bundled_strings(limit: int = 15) -> list[str]:
    out = []
    for name in ("sql", "chat", "instruct"):
        for line in (ROOT / "data" / name / "train.jsonl").read_text().splitlines()[:limit]:
            row = json.loads(line)
            out += [m["content"] for m in row.get("messages", [])]
            out += [str(v) for k, v in row.items() if k != "messages"]
    return out


def test_tokenizer_and_chat_template_equal_transformers_gguf_tokenizer(make):
    path, _ = make("llama", "Q8_0")
    ours = load_tokenizer(model_dir(str(path)).unwrap())
    theirs = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    texts = _bundled_strings()
    assert len(texts) > 60
    for text in texts:
        ids = theirs(text)["input_ids"]
        assert ours(text)["input_ids"] == ids, text
        assert ours.decode(ids) == theirs.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    messages = [{"role": "user", "content": texts[0]}, {"role": "assistant", "content": texts[1]}]
    assert ours.apply_chat_template(messages, tokenize=False) == theirs.apply_chat_template(messages, tokenize=False)
    assert "<|im_start|>" in ours.apply_chat_template(messages, tokenize=False)
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (theirs.bos_token, theirs.eos_token, theirs.pad_token)


def test_a_sentencepiece_vocabulary_tokenizes_as_transformers_does(tmp_path):
    """Llama 2, TinyLlama and Mistral files carry a SentencePiece vocabulary: tokens and scores, no merges."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = _bundled_strings(10)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    alphabet = sorted(set("".join(texts)) - {" "}) + ["\u2581"]
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"],
                                                               initial_alphabet=alphabet))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(
        str(tmp_path / "sp"))
    vocab = tok.get_vocab_size()
    path = write_gguf(build_model("llama", vocab), tmp_path / "sp", tmp_path / "sp.gguf", "Q8_0")
    ours = load_tokenizer(model_dir(str(path)).unwrap())
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in texts + ["  two spaces", "Привет"]:
        ids = theirs(text)["input_ids"]
        assert ours(text)["input_ids"] == ids, text
        assert ours.decode(ids) == theirs.decode(ids)


def test_converted_once_cached_by_identity_and_recorded(make, tmp_path):
    path, _ = make("llama", "Q4_0")
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(path.read_bytes())
    first = model_dir(str(copy)).unwrap()
    assert first == cache_dir(copy) and first.parent.parent.name == "models"
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert model_dir(str(tmp_path)).unwrap() == first  # the directory holding one .gguf
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # not converted again
    record = json.loads((first / "gguf_source.json").read_text())
    assert record["source"] == str(copy.resolve()) and record["size"] == copy.stat().st_size
    assert record["tensor_types"]["blk.0.attn_q.weight"] == "Q4_0"
    assert record["metadata"]["llama.block_count"] == 2 and "tokenizer.ggml.tokens" not in record["metadata"]
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    other, _ = make("llama-tied", "Q8_0")
    time.sleep(0.01)
    copy.write_bytes(other.read_bytes())  # the file changed: converted again, to a new place
    second = model_dir(str(copy)).unwrap()
    assert second != first and json.loads((second / "config.json").read_text())["tie_word_embeddings"]


def test_train_generate_fuse_and_qlora_through_the_cli(make, tmp_path, capsys):
    path, _ = make("llama", "Q8_0")
    data = ROOT / "data" / "sql"
    common = ("--iters", "2", "--batch-size", "2", "--lora-rank", "4", "--max-seq-length", "96",
              "--eval-every", "0")
    code, _, err = run_cli(capsys, "train", "start", path, data, *common, "--output", tmp_path / "mlx")
    assert code == 0, err
    assert json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())["model"] == str(path)
    code, out, err = run_cli(capsys, "generate", path, "--adapter", tmp_path / "mlx", "--prompt", "SELECT",
                             "--max-tokens", "3", "--temp", "0")
    assert code == 0 and "3 tokens" in out + err, err
    code, _, err = run_cli(capsys, "fuse", path, "--adapter", tmp_path / "mlx", "--output", tmp_path / "fused")
    assert code == 0, err
    assert json.loads((tmp_path / "fused" / "config.json").read_text())["model_type"] == "llama"
    code, _, err = run_cli(capsys, "train", "start", path, data, *common, "--quantize-bits", "4",
                           "--quantize-group-size", "32", "--output", tmp_path / "qlora")
    assert code == 0, err
    assert json.loads((tmp_path / "qlora" / "adapter_config.json").read_text())["base_quantization"]["bits"] == 4
    code, _, err = run_cli(capsys, "train", "start", path, data, *common, "--backend", "torch",
                           "--output", tmp_path / "torch")
    assert code == 0, err
    assert (tmp_path / "torch" / "adapters.safetensors").is_file()
    code, out, err = run_cli(capsys, "models", "info", path)
    assert code == 0 and "llama" in out, err


def test_a_recipe_model_field_may_name_a_gguf_file(make, tmp_path, capsys):
    path, _ = make("qwen2", "Q8_0")
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[model]\npath = "{path}"\n\n[data]\npath = "{ROOT / "data" / "sql"}"\n\n'
                      '[train]\niters = 1\nbatch_size = 2\nmax_seq_length = 96\neval_every = 0\n')
    code, _, err = run_cli(capsys, "train", "start", "--recipe", recipe, "--output", tmp_path / "run")
    assert code == 0, err


def _corrupt(path: Path, where: str, out: Path) -> Path:
    """A copy of `path` with a broken header: bad magic, a tensor type id no GGUF has, or cut short."""
    data = bytearray(path.read_bytes())
    if where == "magic":
        data[:4] = b"GGUX"
    elif where == "truncated":
        data = data[: len(data) // 2]
    elif where == "type":
        import gguf

        info = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "blk.0.attn_q.weight").field
        type_at = int(info.offset) + 8 + len(info.name.encode()) + 4 + 8 * 2
        data[type_at:type_at + 4] = (201).to_bytes(4, "little")
    out.write_bytes(bytes(data))
    return out


BAD = {
    "magic": "not a GGUF file (wrong magic bytes",
    "truncated": "truncated or corrupt GGUF file",
    "type": "unknown tensor type",
    "q2k": "has type Q2_K, which FineTune does not dequantize (supported: F32, F16, BF16, Q8_0",
    "arch": "GGUF architecture 'mamba9' is not supported (supported: llama, qwen2",
    "shape": "tensor 'blk.0.ffn_gate.weight' has shape (128, 64) but the metadata implies (96, 64)",
    "missing": "missing tensor 'blk.1.attn_v.weight'",
}


@pytest.fixture(scope="module")
def bad_files(make, tmp_path_factory) -> dict[str, Path]:
    good, _ = make("llama", "F32")
    root = tmp_path_factory.mktemp("bad")
    return {
        **{k: _corrupt(good, k, root / f"{k}.gguf") for k in ("magic", "truncated", "type")},
        "q2k": make("llama", "Q2_K", wide=True)[0],
        "arch": make("llama", "F32", arch="mamba9")[0],
        "shape": make("llama", "F32", overrides={"feed_forward_length": 96})[0],
        "missing": make("llama", "F32", drop=("blk.1.attn_v.weight",))[0],
    }


@pytest.mark.parametrize("kind", list(BAD))
def test_a_bad_gguf_is_one_line_naming_the_file_exit_2(bad_files, kind, capsys):
    path = bad_files[kind]
    for argv in (("generate", path, "--prompt", "hi"), ("models", "info", path)):
        code, _, err = run_cli(capsys, *argv)
        line = error_line(err)
        assert code == 2 and line.startswith(f"ft: error: {path}: ") and BAD[kind] in line, line
    with pytest.raises(UserError, match=str(path)):
        finetune.load(str(path))
    gguf_cache = Path(os.environ["FINETUNE_HOME"]) / "models" / "gguf"
    assert not gguf_cache.is_dir() or not [p for p in gguf_cache.iterdir() if p.name.startswith(".")]


@pytest.mark.skipif(not os.environ.get("FT_REAL_MODEL"), reason="opt-in: FT_REAL_MODEL=/path/to/model.gguf")
def test_real_gguf_end_to_end(tmp_path, capsys):
    """A real llama.cpp file (e.g. SmolLM2-135M-Instruct.Q4_1.gguf): parity, training, a right answer."""
    path = Path(os.environ["FT_REAL_MODEL"])
    started = time.perf_counter()
    directory = model_dir(str(path)).unwrap()
    with capsys.disabled():
        print(f"\nconverted (or found) in {time.perf_counter() - started:.1f} s: {directory}")
    tokenizer = load_tokenizer(directory)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = np.array([tokenizer(prompt, add_special_tokens=False)["input_ids"]], np.int64)
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        reference = ref.eval()(torch.from_numpy(ids)).logits.numpy()
    model, _ = finetune.load(str(path))
    ours = np.array(model(mx.array(ids.astype(np.int32))), np.float32)
    torch_ours = torch_engine_logits(str(path), ids)
    with capsys.disabled():
        print(f"max |MLX - transformers GGUF| = {np.abs(ours - reference).max():.2e}, "
              f"max |torch engine - transformers GGUF| = {np.abs(torch_ours - reference).max():.2e}")
    assert np.abs(ours - reference).max() < 1e-4
    assert np.abs(torch_ours - reference).max() < 1e-4
    code, out, err = run_cli(capsys, "generate", path, "--messages", json.dumps(messages),
                             "--max-tokens", "20", "--temp", "0")
    assert code == 0 and "Paris" in out, out + err
    code, _, err = run_cli(capsys, "train", "start", path, ROOT / "data" / "sql", "--iters", "3", "--batch-size",
                           "2", "--max-seq-length", "256", "--eval-every", "0", "--output", tmp_path / "run")
    assert code == 0, err
    with capsys.disabled():
        print(f"end to end in {time.perf_counter() - started:.1f} s")
