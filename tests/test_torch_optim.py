"""The torch engine's multi-tensor (`torch._foreach_*`) Adam/AdamW and clipping equal the per-tensor
loop they replaced (MLX's semantics: no bias correction, decoupled decay), and their state
round-trips through `state()` / `restore()`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from finetune.core import schedule
from finetune.core.config import TrainingConfig
from finetune.engines.torch.optim import BETAS, EPS, Optimizer, clip_


def reference_update(params, m, v, grads, lr: float, decay: float) -> None:
    """The per-tensor loop the engine ran before (one tensor's ops at a time)."""
    b1, b2 = BETAS
    with torch.no_grad():
        for k, p in params.items():
            g = grads[k]
            if decay:
                p.mul_(1 - lr * decay)
            m[k].mul_(b1).add_(g, alpha=1 - b1)
            v[k].mul_(b2).addcmul_(g, g, value=1 - b2)
            p.sub_(lr * m[k] / (v[k].sqrt() + EPS))


def reference_clip(grads, max_norm: float) -> None:
    norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads.values()))
    factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in grads.values():
        g.mul_(factor)


def tensors(seed: int) -> dict[str, torch.Tensor]:
    """LoRA-like factors in peft's layout and a DoRA magnitude (1-D)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"l.0.q.lora_a": (8, 48), "l.0.q.lora_b": (32, 8), "l.1.up.lora_a": (8, 32), "l.1.up.lora_b": (80, 8), "l.1.up.m": (80,)}
    return {k: torch.randn(s, generator=gen) for k, s in shapes.items()}


@pytest.mark.parametrize(("optimizer", "decay", "clip"), [("adamw", 0.1, 0.5), ("adam", 0.0, 0.0), ("adamw", 0.01, 1e6)])
def test_foreach_steps_equal_the_per_tensor_loop(optimizer, decay, clip):
    cfg = TrainingConfig(iters=8, learning_rate=1e-2, optimizer=optimizer, weight_decay=decay, warmup=2, grad_clip=clip)
    params = tensors(0)
    ref = {k: p.clone() for k, p in params.items()}
    m, v = ({k: torch.zeros_like(p) for k in ref for p in [ref[k]]} for _ in range(2))
    opt, rates = Optimizer(params, cfg, 8), schedule.build(cfg, 8)
    for step in range(6):
        grads = {k: g * 3.0 for k, g in tensors(step + 1).items()}  # norms ~30: clip 0.5 scales
        ref_grads = {k: g.clone() for k, g in grads.items()}
        if clip:
            clip_(grads, clip)
            reference_clip(ref_grads, clip)
            for k in grads:
                torch.testing.assert_close(grads[k], ref_grads[k], rtol=2e-6, atol=0.0)
        opt.update(grads)
        reference_update(ref, m, v, ref_grads, float(rates(np.uint64(step))), decay if optimizer == "adamw" else 0.0)
        for k in params:
            torch.testing.assert_close(params[k], ref[k], rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(opt.m[k], m[k], rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(opt.v[k], v[k], rtol=1e-6, atol=1e-12)
    assert opt.step == 6
    assert not torch.equal(params["l.0.q.lora_a"], tensors(0)["l.0.q.lora_a"])


def test_without_clipping_the_update_is_bit_for_bit_the_loop():
    cfg = TrainingConfig(iters=4, learning_rate=5e-3, optimizer="adamw", weight_decay=0.05)
    params = tensors(0)
    ref = {k: p.clone() for k, p in params.items()}
    m, v = ({k: torch.zeros_like(p) for k, p in ref.items()} for _ in range(2))
    opt, rates = Optimizer(params, cfg, 4), schedule.build(cfg, 4)
    for step in range(4):
        grads = tensors(step + 10)
        opt.update(grads)
        reference_update(ref, m, v, grads, float(rates(np.uint64(step))), 0.05)
    assert all(torch.equal(params[k], ref[k]) and torch.equal(opt.m[k], m[k]) and torch.equal(opt.v[k], v[k]) for k in params)


def test_state_round_trips_and_resumes_the_same_steps():
    cfg = TrainingConfig(iters=6, learning_rate=1e-2, optimizer="adamw", weight_decay=0.1)
    a = Optimizer(tensors(0), cfg, 6)
    for step in range(3):
        a.update(tensors(step + 1))
    state = a.state()
    assert state["l.0.q.lora_a.m"].shape == (48, 8) and state["l.1.up.m.v"].shape == (80,)  # our layout: transposed factors
    assert int(state["step"]) == 3
    b = Optimizer({k: p.clone() for k, p in a.params.items()}, cfg, 6)
    b.restore(state)
    for step in range(3, 5):
        a.update(tensors(step + 1))
        b.update(tensors(step + 1))
    assert all(torch.equal(a.params[k], b.params[k]) and torch.equal(a.m[k], b.m[k]) for k in a.params)
    assert b.step == 5
