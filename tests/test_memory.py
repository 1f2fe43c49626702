"""The memory estimate against the peak real train steps measure, and gradient checkpointing."""

from __future__ import annotations

import math

import msgspec
import pytest
from memory_runs import train_steps
from model_factory import llama_config

from finetune.core import memory, modelinfo
from finetune.core.config import Recipe

CONFIG = llama_config(400)
DEEP = {**CONFIG, "num_hidden_layers": 4}
GPT2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 400, "n_positions": 1024,
        "layer_norm_epsilon": 1e-5}


def recipe(batch: int, rank: int, checkpoint: bool, bits: int, lr: float = 1e-4) -> Recipe:
    return msgspec.convert({"model": {"quantize_bits": bits}, "lora": {"rank": rank}, "train": {
        "batch_size": batch, "iters": 1, "grad_checkpoint": checkpoint, "max_seq_length": 1024, "eval_every": 0,
        "learning_rate": lr}}, Recipe)


# (batch, padded length, rank, checkpointing, bits): the grid's corners and a few points inside.
GRID = [
    (1, 64, 4, False, 0), (16, 64, 64, True, 4), (1, 1024, 64, True, 0), (16, 1024, 4, False, 0),
    (1, 1024, 4, False, 4), (16, 64, 4, False, 0), (4, 256, 16, True, 4), (8, 128, 32, False, 0),
    (2, 512, 8, True, 0),
]


@pytest.mark.parametrize(("batch", "seq", "rank", "checkpoint", "bits"), GRID)
def test_the_estimate_is_within_25_percent_of_the_measured_peak(batch, seq, rank, checkpoint, bits):
    assert_close_estimate(CONFIG, recipe(batch, rank, checkpoint, bits), seq)


@pytest.mark.parametrize(("batch", "seq", "checkpoint"), [(16, 64, False), (2, 512, True)])
def test_the_estimate_holds_for_gpt2_blocks_too(batch, seq, checkpoint):
    assert_close_estimate(GPT2, recipe(batch, 8, checkpoint, 0), seq)


def assert_close_estimate(config: dict, r: Recipe, seq: int, supervised: float = 0.5) -> None:
    peak, losses = train_steps(config, r, seq, supervised, steps=1)
    chosen = 64 * math.ceil(r.train.batch_size * int(seq * supervised) / 64)  # make_batch pads the selection to 64
    est = memory.estimate(modelinfo.facts(config).unwrap(), r, seq, supervised=chosen)
    assert math.isfinite(losses[0])
    assert abs(est.total_gb * memory.GB / peak - 1) <= 0.25, (est, peak / memory.GB)


def test_grad_checkpointing_gives_the_same_losses_with_less_activation_memory():
    facts = modelinfo.facts(DEEP).unwrap()
    plain, ckpt = recipe(4, 8, False, 0, lr=0.05), recipe(4, 8, True, 0, lr=0.05)
    peak_plain, losses_plain = train_steps(DEEP, plain, 128, steps=2)
    peak_ckpt, losses_ckpt = train_steps(DEEP, ckpt, 128, steps=2)
    assert losses_ckpt == pytest.approx(losses_plain, rel=1e-5)
    assert len(losses_plain) == 2 and abs(losses_plain[-1] - losses_plain[0]) > 1e-2  # the updates matter
    est = memory.estimate(facts, plain, 128)
    fixed = (est.weights_gb + est.lora_gb) * memory.GB  # weights and adapter state: the same in both
    assert peak_ckpt - fixed < 0.75 * (peak_plain - fixed)
