"""Generation: parity with transformers' greedy decoding, the KV cache, sampling, stops, streaming, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest
import torch
from hf_models import build_hf, save_hf
from transformers import LlamaConfig, LlamaForCausalLM

from finetune.cli import main
from finetune.core.convert import hf_to_mlx
from finetune.core.records import Message
from finetune.core.templates import render
from finetune.core.tokenize import tokenize
from finetune.engines.mlx import device as backend
from finetune.engines.mlx import generate as gen
from finetune.engines.mlx.generate import generate
from finetune.engines.mlx.model import build
from finetune.engines.mlx.sampling import sample
from finetune.files.tokenizer import encoder, load_tokenizer, specials, train_bpe
from finetune.files.weights import read_checkpoint
from finetune.shell.generation import TextStream, build_prompt, decoder

VARIANTS = ("llama", "qwen2", "gpt2")
PROMPT = [5, 17, 33, 99, 120, 7]
CORPUS = [
    "SELECT name FROM users WHERE age > 30",
    "hello world, how are you today?",
    "### Instruction:\nsay hi\n\n### Response:\nhi there",
    "the answer is 42 and the city is Paris",
] * 20
MULTIBYTE = "naïve café — 日本語 🙂 ok"


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    """variant -> (HF model, our model with the same weights), built once per module."""
    cache: dict[str, tuple] = {}

    def get(variant: str):
        if variant not in cache:
            hf = build_hf(variant)
            directory = save_hf(hf, tmp_path_factory.mktemp(variant))
            config = json.loads((directory / "config.json").read_text())
            weights = hf_to_mlx(config["model_type"], config, read_checkpoint(directory).unwrap())
            ours = build(config).load_weights(list(weights.unwrap().items()), strict=True)
            cache[variant] = (hf, ours)
        return cache[variant]

    return get


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A real byte-level BPE (BOS added, chatml template) trained on ASCII text."""
    return load_tokenizer(train_bpe(CORPUS, tmp_path_factory.mktemp("tok") / "bpe", vocab_size=300))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama in HF layout beside that tokenizer: a complete local MODEL."""
    directory = tmp_path_factory.mktemp("model") / "tiny-llama"
    tokenizer.save_pretrained(directory)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).float().save_pretrained(directory)
    return directory


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    hf.generation_config.eos_token_id = None  # never stop early: compare all n tokens
    hf.generation_config.pad_token_id = 0
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n)
    return out[0, len(prompt) :].tolist()


def recomputed(model, prompt: list[int], n: int, temp: float, top_p: float, seed: int) -> list[int]:
    """The same decoding without a cache: the whole sequence re-run for every token."""
    ids, key = list(prompt), mx.random.key(seed)
    for _ in range(n):
        key, sub = mx.random.split(key)
        logits = model(mx.array([ids]))[0, -1]
        ids.append(sample(logits, temp=temp, top_p=top_p, key=sub).item())
    return ids[len(prompt) :]


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_generation_matches_transformers(parity, variant):
    hf, ours = parity(variant)
    expected = hf_greedy(hf, PROMPT, 24)
    assert len(set(expected)) > 3  # a real sequence, not one repeated token
    assert list(generate(ours, PROMPT, max_tokens=24)) == expected


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("temp", "top_p"), [(0.0, 1.0), (1.0, 1.0), (0.8, 0.9)])
def test_kv_cache_equals_recomputing_the_full_forward(parity, variant, temp, top_p):
    ours = parity(variant)[1]
    got = list(generate(ours, PROMPT, max_tokens=16, temp=temp, top_p=top_p, seed=3))
    assert got == recomputed(ours, PROMPT, 16, temp, top_p, seed=3)


def test_chunked_prefill_equals_one_pass(parity, monkeypatch):
    ours = parity("llama")[1]
    prompt = [(7 * i + 3) % 256 for i in range(23)]
    whole = list(generate(ours, prompt, max_tokens=10))
    monkeypatch.setattr(gen, "PREFILL_CHUNK", 4)  # 22 cached prompt tokens in 6 passes
    assert list(generate(ours, prompt, max_tokens=10)) == whole == recomputed(ours, prompt, 10, 0.0, 1.0, 0)


def test_sampling_is_reproducible_by_seed(parity):
    ours = parity("qwen2")[1]

    def run(seed: int, n: int = 20) -> list[int]:
        return list(generate(ours, PROMPT, max_tokens=n, temp=1.0, top_p=0.95, seed=seed))

    assert run(11) == run(11)
    assert run(11) != run(12)
    assert run(11, n=30)[:20] == run(11)  # a longer run extends the same sequence


def test_generation_stops_at_a_stop_id_without_yielding_it(parity):
    ours = parity("llama")[1]
    full = list(generate(ours, PROMPT, max_tokens=12))
    stop = full[4]
    got = list(generate(ours, PROMPT, max_tokens=12, stop_ids=(stop,)))
    assert got == full[: full.index(stop)] and len(got) <= 4
    assert list(generate(ours, PROMPT, max_tokens=3)) == full[:3]


def stream(tokenizer, ids: list[int], stops=()) -> tuple[list[str], TextStream]:
    text = TextStream(decoder(tokenizer), stops)
    pieces = [text.add(t) for t in ids]
    return [*pieces, text.finish()], text


def test_stream_emits_only_complete_characters(tokenizer):
    ids = tokenizer(MULTIBYTE, add_special_tokens=False)["input_ids"]
    singles = [tokenizer.decode([t]) for t in ids]
    assert any("\ufffd" in s for s in singles)  # guard: some tokens do split characters
    pieces, _ = stream(tokenizer, ids)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == MULTIBYTE
    assert all(p.encode("utf-8").decode("utf-8") == p for p in pieces)


def test_stream_keeps_spaces_between_tokens(tokenizer):
    text = "hello world, how are you today?"
    pieces, _ = stream(tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"])
    assert "".join(pieces) == text and sum(bool(p) for p in pieces) > 3


def test_stream_stops_at_a_stop_string_and_holds_back_its_start(tokenizer):
    ids = tokenizer("hi there\n### Response:\nmore", add_special_tokens=False)["input_ids"]
    pieces, text = stream(tokenizer, ids, stops=("### Response",))
    assert "".join(pieces) == "hi there\n" and text.stopped
    assert all("#" not in p for p in pieces)
    # A prefix of a stop string that turns out not to be one is released, in order.
    pieces, text = stream(tokenizer, tokenizer("a ## b", add_special_tokens=False)["input_ids"], ("###",))
    assert "".join(pieces) == "a ## b" and not text.stopped


def test_raw_prompt_is_tokenized_as_is_with_bos(tokenizer):
    prompt = build_prompt(tokenizer, text="SELECT name").unwrap()
    assert list(prompt.ids) == tokenizer("SELECT name")["input_ids"]  # BOS + text, as HF does
    assert prompt.ids[0] == tokenizer.bos_token_id
    assert prompt.stop_ids == (tokenizer.eos_token_id,)


def test_chat_prompt_is_a_prefix_of_the_training_tokens(tokenizer):
    from finetune.core.records import Sample

    turns = (Message("system", "be brief"), Message("user", "say hi"))
    prompt = build_prompt(tokenizer, messages=turns, template="chatml").unwrap()
    full = Sample(format="chat", messages=(*turns, Message("assistant", "hi there")))
    sp = specials(tokenizer)
    trained = tokenize(render(full, "chatml", sp).unwrap(), encoder(tokenizer), sp)
    assert trained.ids[: len(prompt.ids)] == prompt.ids
    assert trained.mask[len(prompt.ids)] == 1  # the next token is the first answer token
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert set(prompt.stop_ids) == {im_end, tokenizer.eos_token_id}


def test_model_template_stops_at_its_end_of_turn_marker(tokenizer):
    from finetune.core.templates import Jinja

    prompt = build_prompt(tokenizer, text="hi", template=Jinja(tokenizer.chat_template)).unwrap()
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in prompt.stop_ids
    assert prompt.ids[-3:] == tuple(tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"])[-3:]


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["generate", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_streams_text_and_reports_speed(model_dir, tokenizer, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("FINETUNE_HOME", str(tmp_path))
    code, out, err = run_cli(capsys, str(model_dir), "--prompt", "SELECT name", "--max-tokens", "12")
    assert code == 0, err
    assert "backend: cpu" in err or "backend: metal" in err or "backend: cuda" in err
    stats = err.strip().splitlines()[-1]
    assert stats.endswith("tokens/s)") and "tokens/s (prompt: " in stats
    # The streamed text is exactly the decoded greedy tokens of the library call.
    from finetune.engines.mlx.load import load_model

    model, tok = load_model(str(model_dir)).unwrap()
    plan = build_prompt(tok, text="SELECT name").unwrap()
    ids = list(generate(model, plan.ids, max_tokens=12, stop_ids=plan.stop_ids))
    assert stats.startswith(f"{len(ids)} tokens, ")
    assert out == tok.decode(ids) + "\n"


def test_cli_messages_and_template(model_dir, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("FINETUNE_HOME", str(tmp_path))
    chat = json.dumps([{"role": "user", "content": "say hi"}])
    code, _, err = run_cli(capsys, str(model_dir), "--messages", chat, "--max-tokens", "5",
                           "--temp", "0.7", "--top-p", "0.9", "--seed", "1", "-v")
    assert code == 0, err
    assert "prompt: " in err and "stop ids" in err
    file = tmp_path / "chat.json"
    file.write_text(chat)
    again = run_cli(capsys, str(model_dir), "--messages", str(file), "--max-tokens", "5",
                    "--temp", "0.7", "--top-p", "0.9", "--seed", "1", "-v")
    assert again[0] == 0 and again[2].splitlines()[-1].split(",")[0] == err.splitlines()[-1].split(",")[0]
    code, _, err = run_cli(capsys, str(model_dir), "--prompt", "hi", "--template", "llama3", "--max-tokens", "3")
    assert code == 0, err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--messages", '[{"role": "user", "content": "hi"'], "--messages: not valid JSON"),
        (["--messages", '[{"role": "bot", "content": "hi"}]'], "messages[0].role 'bot' is not one of"),
        (["--messages", '{"role": "user"}'], "'messages' must be a list"),
        (["--messages", "[]"], "'messages' is empty"),
        (["--prompt", "x", "--messages", "[]"], "exactly one of --prompt and --messages"),
        ([], "exactly one of --prompt and --messages"),
        (["--prompt", "x", "--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--prompt", "x", "--temp", "-1"], "--temp must be >= 0"),
        (["--prompt", "x", "--template", "nope"], "--template: unknown template 'nope'"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(model_dir, capsys, monkeypatch, tmp_path, args, message):
    monkeypatch.setenv("FINETUNE_HOME", str(tmp_path))
    code, out, err = run_cli(capsys, str(model_dir), *args)
    assert code == 2 and out == ""
    last = err.strip().splitlines()[-1]
    assert last.startswith("ft: error: ") and message in last


def test_cli_device_gpu_needs_a_gpu(model_dir, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("FINETUNE_HOME", str(tmp_path))
    code, _, err = run_cli(capsys, str(model_dir), "--prompt", "hi", "--max-tokens", "2", "--device", "gpu")
    try:
        assert code == (0 if backend.gpu_api() else 2), err
        assert backend.gpu_api() or "--device gpu: this MLX build sees no GPU" in err
    finally:
        mx.set_default_device(mx.cpu if backend.gpu_api() is None else mx.gpu)


def test_cli_generates_with_the_builtin_tiny_model(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("FINETUNE_HOME", str(tmp_path))
    code, out, err = run_cli(capsys, "tiny", "--prompt", "SELECT", "--max-tokens", "8", "--device", "cpu")
    assert code == 0, err
    assert out.endswith("\n") and "tokens/s (prompt: " in err


def test_missing_model_is_a_user_error(capsys, tmp_path):
    code, _, err = run_cli(capsys, str(tmp_path / "nope"), "--prompt", "hi")
    assert code == 2 and "ft: error: " in err


def test_generate_needs_a_prompt_token(parity):
    with pytest.raises(ValueError, match="at least one prompt token"):
        next(generate(parity("gpt2")[1], [], max_tokens=2))


def test_prompt_file_path_for_messages_must_exist(model_dir, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("FINETUNE_HOME", str(tmp_path))
    code, _, err = run_cli(capsys, str(model_dir), "--messages", str(Path(tmp_path) / "missing.json"))
    assert code == 2 and "--messages: not valid JSON" in err


# The torch engine (`--backend torch`): the same tokens as the MLX engine where both decode greedily.


@pytest.mark.parametrize("variant", VARIANTS)
def test_torch_engine_greedy_equals_the_mlx_engine(parity, variant):
    from finetune.engines.torch import generate as torch_gen

    hf, ours = parity(variant)
    expected = list(generate(ours, PROMPT, max_tokens=24))
    assert len(set(expected)) > 3
    assert list(torch_gen.generate(hf, PROMPT, max_tokens=24)) == expected
    # Chunked prefill, stop ids and seeded sampling behave as in the MLX loop.
    long = [(7 * i + 3) % 256 for i in range(23)]
    whole = list(torch_gen.generate(hf, long, max_tokens=10))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch_gen, "PREFILL_CHUNK", 4)
        assert list(torch_gen.generate(hf, long, max_tokens=10)) == whole == list(generate(ours, long, max_tokens=10))
    stop = expected[4]
    assert list(torch_gen.generate(hf, PROMPT, max_tokens=24, stop_ids=(stop,))) == expected[: expected.index(stop)]

    def sampled(seed: int, n: int = 20) -> list[int]:
        return list(torch_gen.generate(hf, PROMPT, max_tokens=n, temp=1.0, top_p=0.95, seed=seed))

    assert sampled(11) == sampled(11) != sampled(12)
    assert sampled(11, n=30)[:20] == sampled(11)


def test_torch_nucleus_keeps_the_tokens_mlx_keeps():
    import numpy as np

    from finetune.engines.mlx.sampling import nucleus
    from finetune.engines.torch.generate import nucleus as torch_nucleus

    rng = np.random.default_rng(0)
    logits = np.round(rng.standard_normal(64) * 3, 1).astype(np.float32)  # rounded: ties happen
    for top_p in (0.0, 0.1, 0.5, 0.9, 0.999, 1.0):
        ours = np.isfinite(np.array(nucleus(mx.array(logits), top_p)))
        theirs = np.isfinite(torch_nucleus(torch.from_numpy(logits), top_p).numpy())
        assert ours.sum() >= 1 and (ours == theirs).all(), top_p


def test_torch_engine_on_tiny_with_an_adapter_matches_mlx(capsys, tmp_path):
    """`ft generate tiny --adapter` prints the same text with either engine (greedy, float32)."""
    from lora_models import random_adapter

    from finetune.files.tiny import ensure_tiny

    adapter = random_adapter(ensure_tiny(), tmp_path / "adapter", b_std=4.0, num_layers=2,
                             keys=("self_attn.v_proj", "mlp.down_proj"))
    texts = {}
    for engine in ("mlx", "torch"):
        for extra in ((), ("--adapter", str(adapter))):
            code, out, err = run_cli(capsys, "tiny", "--prompt", "SELECT name FROM", "--max-tokens", "16",
                                     "--backend", engine, *extra)
            assert code == 0, err
            assert ("backend: torch" in err) == (engine == "torch")
            texts[engine, bool(extra)] = out
    assert texts["mlx", False] == texts["torch", False]
    assert texts["mlx", True] == texts["torch", True] != texts["torch", False]  # the adapter counts
    assert main(["adapters", "export", str(adapter), "--format", "peft", "--output", str(tmp_path / "peft")]) == 0
    capsys.readouterr()
    code, out, err = run_cli(capsys, "tiny", "--prompt", "SELECT name FROM", "--max-tokens", "16",
                             "--backend", "torch", "--adapter", str(tmp_path / "peft"))
    assert code == 0 and out == texts["torch", True], err  # the same adapter in PEFT's files


def test_torch_engine_reads_bfloat16_adapters_like_mlx(capsys, tmp_path):
    from lora_models import random_adapter

    from finetune.files.tiny import ensure_tiny

    adapter = random_adapter(ensure_tiny(), tmp_path / "adapter", b_std=4.0, num_layers=2,
                             keys=("self_attn.v_proj", "mlp.down_proj"))
    weights = adapter / "adapters.safetensors"
    mx.save_safetensors(str(weights), {k: v.astype(mx.bfloat16) for k, v in mx.load(str(weights)).items()})
    texts = []
    for engine in ("mlx", "torch"):
        code, out, err = run_cli(capsys, "tiny", "--prompt", "SELECT name FROM", "--max-tokens", "8",
                                 "--backend", engine, "--adapter", str(adapter))
        assert code == 0, err
        texts.append(out)
    assert texts[0] == texts[1]


def test_torch_engine_refuses_quantized_bases_in_one_line(capsys, tmp_path):
    from finetune.files.tiny import ensure_tiny

    quantized = tmp_path / "q4"
    quantized.mkdir()
    for f in ensure_tiny().iterdir():
        if f.name != "config.json":
            (quantized / f.name).symlink_to(f)
    config = json.loads((ensure_tiny() / "config.json").read_text())
    (quantized / "config.json").write_text(json.dumps({**config, "quantization": {"group_size": 64, "bits": 4}}))
    code, out, err = run_cli(capsys, str(quantized), "--prompt", "hi", "--backend", "torch")
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [f"ft: error: {quantized}: an mlx-lm quantized checkpoint; "
                                        "the torch engine runs float bases only (quantized bases are the MLX engine's); use --backend mlx"]


def test_torch_engine_device_gpu_needs_a_gpu(capsys):
    code, out, err = run_cli(capsys, "tiny", "--prompt", "hi", "--max-tokens", "2", "--backend", "torch", "--device", "gpu")
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        assert code == 0 and "backend: torch" in err, err
    else:
        assert code == 2 and out == ""
        assert err.strip().splitlines() == ["ft: error: --device gpu: torch sees no GPU (no CUDA, no MPS); use --device cpu"]


@pytest.mark.parametrize("variant", ["gpt2", "qwen2"])
def test_torch_engine_attaches_adapters_as_the_mlx_engine_does(variant, tmp_path):
    """GPT-2's Conv1D (peft's fan_in_fan_out) and Qwen2's biased projections, adapter on the last layer."""
    from lora_models import build_hf, make_tokenizer, ours, random_adapter, write_model

    from finetune.engines.torch import generate as torch_gen
    from finetune.engines.torch import load as torch_load

    tok_dir, vocab = make_tokenizer(tmp_path / "tok")
    directory = write_model(build_hf(variant, vocab), tmp_path / variant, tok_dir)
    adapter = random_adapter(directory, tmp_path / "adapter", num_layers=1, b_std=0.3)
    expected = list(generate(ours(directory, adapter), PROMPT, max_tokens=16))
    assert expected != list(generate(ours(directory), PROMPT, max_tokens=16))  # the adapter counts
    model, _ = torch_load.load(str(directory), str(adapter), torch.device("cpu")).unwrap()
    assert list(torch_gen.generate(model, PROMPT, max_tokens=16)) == expected


def test_torch_engine_reads_a_peft_adapter_on_a_first_layer(capsys, tmp_path):
    """Layers other than the last N (PEFT's layers_to_transform may pick any): the rest add nothing."""
    from lora_models import build_hf, make_tokenizer, ours, random_adapter, write_model
    from safetensors.numpy import load_file, save_file

    from finetune.engines.torch import generate as torch_gen
    from finetune.engines.torch import load as torch_load

    tok_dir, vocab = make_tokenizer(tmp_path / "tok")
    directory = write_model(build_hf("qwen2", vocab), tmp_path / "qwen2", tok_dir)
    last = random_adapter(directory, tmp_path / "last", num_layers=1, b_std=0.3)  # layer 1 of 2
    assert main(["adapters", "export", str(last), "--format", "peft", "--output", str(tmp_path / "peft")]) == 0
    capsys.readouterr()
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    save_file({k.replace(".layers.1.", ".layers.0."): v for k, v in load_file(str(weights)).items()}, str(weights))
    expected = list(generate(ours(directory, tmp_path / "peft"), PROMPT, max_tokens=16))
    assert expected != list(generate(ours(directory, last), PROMPT, max_tokens=16))
    model, _ = torch_load.load(str(directory), str(tmp_path / "peft"), torch.device("cpu")).unwrap()
    assert list(torch_gen.generate(model, PROMPT, max_tokens=16)) == expected
