"""`ft eval`, `finetune.evaluate` and `--eval-generate` on a small llama that LoRA memorises.

Three rows whose answers we control: trained for 100 steps an adapter answers all three exactly
(exact match 1.0) while the random base answers none (0.0), on either engine.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from cli_run import error_line, run_cli
from transformers import LlamaConfig, LlamaForCausalLM

import finetune
from finetune.core import evaluation
from finetune.engines.mlx import evaluate as mlx_engine
from finetune.files.tokenizer import load_tokenizer

ROWS = [{"prompt": "hello", "completion": " world"}, {"prompt": "how", "completion": " are you"},
        {"prompt": "fine", "completion": " thanks today"}]
TRAIN = dict(iters=100, batch_size=3, learning_rate=1e-3, schedule="constant", eval_every=50,
             report_every=50, eval_generate=3)


def write_rows(directory: Path, rows: list[dict], splits=("train", "valid", "test")) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for split in splits:
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


@pytest.fixture(scope="module")
def small(tmp_path_factory, tokenizer_dir) -> Path:
    """A 2-layer llama with order-one random weights (so LoRA moves its logits fast)."""
    out = tmp_path_factory.mktemp("small") / "llama"
    shutil.copytree(tokenizer_dir, out)
    tok = load_tokenizer(out)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_rows(tmp_path_factory.mktemp("data") / "memorise", ROWS)


@pytest.fixture(scope="module")
def runs(small, data, tmp_path_factory) -> dict[str, Path]:
    """The same recipe trained by each engine (with --eval-generate 3)."""
    root = tmp_path_factory.mktemp("runs")
    return {engine: finetune.train(None, model=str(small), data=str(data), output=root / engine, backend=engine,
                                   **TRAIN).run_dir for engine in ("mlx", "torch")}


def test_memorised_adapter_answers_exactly_and_the_base_does_not(small, data, runs, capsys, tmp_path):
    out = tmp_path / "predictions.jsonl"
    code, stdout, err = run_cli(capsys, "eval", small, data, "--adapter", runs["mlx"], "--out", out, "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert (result["split"], result["engine"], result["complete"]) == ("test", "mlx", True)
    base, adapted = result["results"]
    assert (base["name"], adapted["name"]) == ("base", str(runs["mlx"]))
    assert (base["rows"], base["exact"], adapted["rows"], adapted["exact"]) == (3, 0.0, 3, 1.0)
    assert adapted["loss"] < 0.5 < 3 < base["loss"]
    assert adapted["perplexity"] == pytest.approx(2.718281828 ** adapted["loss"])
    assert base["generated_tokens"] > 0 and base["tokens_per_second"] > 0
    lines = out.read_text().splitlines()
    assert len(lines) == 6
    records = [json.loads(line) for line in lines]
    assert [(r["model"], r["line"]) for r in records] == [("base", i) for i in (1, 2, 3)] + [(str(runs["mlx"]), i) for i in (1, 2, 3)]
    for r, row in zip(records[3:], ROWS, strict=True):
        assert r["prediction"] == r["reference"] == row["completion"] and r["exact"] and r["contains"]
    assert not any(r["exact"] for r in records[:3])


def test_the_table_has_a_row_for_the_base_and_each_adapter(small, data, runs, capsys):
    code, stdout, err = run_cli(capsys, "eval", small, data, "--adapter", runs["mlx"], runs["torch"])
    assert code == 0, err
    for column in ("model", "rows", "exact match", "loss", "perplexity", "seconds", "tokens/s"):
        assert column in stdout
    rows = [line for line in stdout.splitlines() if line.startswith("│")]
    assert [r.split("│")[1].strip() for r in rows][0] == "base" and len(rows) >= 3
    assert [r.split("│")[3].strip() for r in rows if r.split("│")[3].strip()] == ["0.000", "1.000", "1.000"]


def test_both_engines_agree_on_both_runs(small, data, runs, tmp_path):
    """Each engine scores either engine's adapter 1.0, with the same predictions and close losses."""
    seen = {}
    for engine in ("mlx", "torch"):
        out = tmp_path / f"{engine}.jsonl"
        result = finetune.evaluate(small, data, [runs["mlx"], runs["torch"]], backend=engine, out=out)
        assert result.engine == engine and [s.exact for s in result.results] == [0.0, 1.0, 1.0]
        seen[engine] = result
        assert [json.loads(line)["prediction"] for line in out.read_text().splitlines()][3:] == \
            [r["completion"] for r in ROWS] * 2
    for a, b in zip(seen["mlx"].results, seen["torch"].results, strict=True):
        assert a.loss == pytest.approx(b.loss, rel=1e-3, abs=1e-4)


def test_metrics_record_exact_match_at_each_validation(runs):
    for run in runs.values():
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [(r["step"], r["val_exact_match"]) for r in rows] == [(50, 1.0), (100, 1.0)]
        assert "eval_generate = 3" in (run / "recipe.toml").read_text()


def test_exact_match_and_contains_are_computed_on_collapsed_whitespace(small, data, runs, tmp_path, capsys):
    """References we change: extra whitespace still matches; a shorter one is contained, not exact."""
    changed = write_rows(tmp_path / "changed", [ROWS[0], {**ROWS[1], "completion": "  are \t you "},
                                                {**ROWS[2], "completion": " thanks"}], splits=("train", "test"))
    result = finetune.evaluate(small, changed, runs["mlx"], metric="contains")
    adapted = result.results[1]
    assert adapted.exact == pytest.approx(2 / 3) and adapted.contains == 1.0
    code, stdout, _ = run_cli(capsys, "eval", small, changed, "--adapter", runs["mlx"], "--metric", "contains")
    assert code == 0 and "contains" in stdout and "exact match" not in stdout


def test_batches_give_the_answers_one_row_at_a_time_gives(runs, small, data):
    one = finetune.evaluate(small, data, [runs["mlx"]], batch_size=1)
    three = finetune.evaluate(small, data, [runs["mlx"]], batch_size=3)
    assert [s.exact for s in one.results] == [s.exact for s in three.results] == [0.0, 1.0]
    assert one.results[1].loss == pytest.approx(three.results[1].loss, rel=1e-5)


def test_tiny_on_the_sql_test_split_with_either_engine(tmp_path, capsys):
    texts = {}
    for engine in ("mlx", "torch"):
        out = tmp_path / f"{engine}.jsonl"
        code, stdout, err = run_cli(capsys, "eval", "tiny", "sql", "--limit", "4", "--max-tokens", "6",
                                    "--backend", engine, "--out", out, "--batch-size", "3")
        assert code == 0, err
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["line"] for r in rows] == [1, 2, 3, 4] and all(r["tokens"] <= 6 for r in rows)
        assert rows[0]["reference"] == json.loads(Path(finetune.__file__).parents[1].joinpath(
            "data/sql/test.jsonl").read_text().splitlines()[0])["completion"]
        texts[engine] = [r["prediction"] for r in rows]
        assert "│ base" in stdout
    assert texts["mlx"] == texts["torch"]


def test_metric_loss_generates_nothing(small, data, runs):
    result = finetune.evaluate(small, data, runs["mlx"], metric="loss")
    assert [(s.rows, s.exact, s.loss_rows, s.generated_tokens) for s in result.results] == [(0, None, 3, 0)] * 2
    assert result.results[1].loss < result.results[0].loss


def test_text_rows_split_at_the_marker_of_the_run_recipe(small, tmp_path):
    rows = [{"text": "Q: hello\nA: world"}, {"text": "Q: how\nA: are you"}]
    text = write_rows(tmp_path / "text", rows)
    run = finetune.train(None, model=str(small), data=str(text), output=tmp_path / "run", iters=2, batch_size=2,
                         eval_every=0, answer_after="A: ").run_dir
    out = tmp_path / "p.jsonl"
    result = finetune.evaluate(small, text, [run], out=out, max_tokens=3)
    assert result.results[0].rows == 2
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [evaluation.collapse(r["reference"]) for r in records[:2]] == ["world", "are you"]
    with pytest.raises(finetune.UserError, match="--answer-after"):
        finetune.evaluate(small, text)  # no run recipe says where the answer starts


def test_ctrl_c_keeps_what_is_done(small, data, runs, capsys, tmp_path, monkeypatch):
    """Ctrl-C during the adapter's second batch: the base and one adapter row are kept, exit 130."""
    real, calls = mlx_engine.greedy, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # the base takes two batches (2 + 1 rows), the adapter one, then Ctrl-C
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(mlx_engine, "greedy", interrupted)
    out = tmp_path / "p.jsonl"
    code, stdout, err = run_cli(capsys, "eval", small, data, "--adapter", runs["mlx"], "--batch-size", "2", "--out", out)
    assert code == 130, err
    assert "(interrupted)" in stdout and "Interrupted" in stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["model"] for r in records] == ["base"] * 3 + [str(runs["mlx"])] * 2
    assert records[-1]["exact"]


@pytest.mark.parametrize(("args", "message"), [
    (("tiny", "chat"), "no test split (has: train, valid)"),
    (("tiny", "no-such-set"), "no-such-set: no such file"),
    (("tiny", "sql", "--limit", "0"), "--limit 0"),
    (("tiny", "sql", "--batch-size", "0"), "--batch-size 0"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    code, _, err = run_cli(capsys, "eval", *args)
    assert code == 2 and message in error_line(err)


def test_an_adapter_for_another_base_is_refused(data, runs, capsys, tmp_path):
    code, _, err = run_cli(capsys, "eval", "tiny", data, "--adapter", runs["mlx"], "--limit", "1")
    assert code == 2 and "adapters.safetensors" in error_line(err)
    code, _, err = run_cli(capsys, "eval", "tiny", data, "--adapter", tmp_path / "nothing")
    assert code == 2 and "nothing" in error_line(err)


def test_legacy_run_loss_form_still_returns_a_float(runs):
    loss = finetune.evaluate(runs["mlx"], split="test")
    assert isinstance(loss, float) and loss < 0.5


def test_the_result_is_frozen(small, data):
    result = finetune.evaluate(small, data, limit=1, max_tokens=2)
    assert len(result.results) == 1 and result.results[0].rows == 1
    with pytest.raises(AttributeError):
        result.results = ()


def test_the_loss_plot_draws_exact_match_only_where_recorded(runs, tmp_path):
    from finetune.shell import plot

    with_em = plot.read_metrics(runs["mlx"]).unwrap()
    without = [{k: v for k, v in r.items() if k != "val_exact_match"} for r in with_em]
    assert len(plot.figure({"a": without}).axes) == 1 and "exact match" not in plot.text_curve(without)
    fig = plot.figure({"a": with_em, "b": without})
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == "validation exact match"
    assert [line.get_label() for line in fig.axes[1].get_lines()] == ["a exact match"]
    assert plot.text_curve(with_em).endswith("Val exact match by step: 50: 1.000, 100: 1.000")


def test_a_qlora_adapter_gets_its_quantized_base(small, data, runs, tmp_path):
    """The float base serves the plain adapter; the QLoRA one is scored on the 8-bit base it trained on."""
    q8 = finetune.train(None, model=str(small), data=str(data), output=tmp_path / "q8", backend="mlx",
                        quantize_bits=8, **{**TRAIN, "eval_generate": 0}).run_dir
    lines = []
    result = finetune.evaluate(small, data, [q8, runs["mlx"]], log=lines.append)
    assert result.engine == "mlx" and [s.exact for s in result.results] == [0.0, 1.0, 1.0]
    assert any("quantized base" in line for line in lines)


def test_extend_answers_ends_rows_at_a_stop_token_or_when_done():
    out, active = [[], [7], []], [True, True, False]
    assert evaluation.extend_answers(out, active, [5, 2, 9], frozenset({2}), lambda i, ids: False)
    assert (out, active) == ([[5], [7], []], [True, False, False])  # the stop token is not kept
    assert not evaluation.extend_answers(out, active, [6, 4, 4], frozenset({2}), lambda i, ids: len(ids) == 2)
    assert (out, active) == ([[5, 6], [7], []], [False, False, False])
