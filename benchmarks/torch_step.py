"""In-process A/B of the torch engine's train step (and a profile of it), variants alternating step by
step on the same batches, so a contended machine slows them alike.

    python benchmarks/torch_step.py [--model smollm|tiny] [--batch 4] [--steps 12]
        [--variants peft,engine,engine+kernels,engine-1thread] [--profile VARIANT]

Each variant trains its own copy of the same random-initialised model (benchmarks/torch_engine.py's
shapes) on the bundled SQL rows as text (every token supervised), one optimizer step per batch:
`engine` is the engine's model and step (load, attach, supervised_ce, clipping, MLX's AdamW) at its
default dtype; `engine+kernels` adds `engines.torch.kernels.install` (`engine+lora+sdpa`: those of its parts;
`engine+kernels-noautocast`: and no autocast); `engine-1thread` runs the
engine's step with one intra-op thread; `peft` is benchmarks/torch_engine.py's plain PEFT float32
step. Printed: median wall and CPU seconds per step, and the median over batches of each
variant's speed-up against the first variant (wall and CPU time: the CPU time counts the work, not
the waiting for a contended core).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the engine sets for itself

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from torch_engine import write_model  # noqa: E402  (the same random-initialised shapes)
from train_vs_mlxlm import MODELS  # noqa: E402

from finetune.core import batching  # noqa: E402
from finetune.core.config import Recipe  # noqa: E402
from finetune.core.tokenize import Tokens  # noqa: E402
from finetune.engines.torch import kernels  # noqa: E402
from finetune.engines.torch.optim import Optimizer, clip_  # noqa: E402


def batches(directory: Path, size: int, n: int) -> list[tuple[torch.Tensor, ...]]:
    """The first `n` batches of the engine's length-sorted plan over the SQL rows as text."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    rows = [json.loads(x) for x in (ROOT / "data/sql/train.jsonl").read_text().splitlines()[:1000]]
    examples = []
    for r in rows:
        ids = tok(r["prompt"] + r["completion"])["input_ids"] + [tok.eos_token_id]
        examples.append(Tokens(ids=tuple(ids), mask=(0,) + (1,) * (len(ids) - 1)))
    plan = batching.length_sorted([len(t.ids) for t in examples], size)
    out = []
    for i in range(n):
        b = batching.make_batch([[examples[j] for j in row] for row in plan[batching.batch_at(len(plan), 0, i)]], 256)
        out.append((torch.from_numpy(b.inputs.astype(np.int64)), torch.from_numpy(b.select.astype(np.int64)),
                    torch.from_numpy(b.targets.astype(np.int64)), torch.from_numpy(b.weights)))
    return out


def engine_step(directory: Path, parts: tuple[str, ...], autocast: bool = True):
    """The engine's model at its default dtype, and one optimizer step of its loop (without I/O);
    `autocast=False`: the model's hidden states without the engine's autocast (with the kernels,
    whose LoRA forward casts the factors itself)."""
    from finetune.engines.torch import device as devices
    from finetune.engines.torch import lora as tlora
    from finetune.engines.torch.load import load_base
    from finetune.engines.torch.step import supervised_ce

    recipe = msgspec.convert({"model": {"path": str(directory)}, "data": {"path": "sql"},
                              "train": {"batch_size": 4, "iters": 1000, "learning_rate": 2e-4}}, Recipe)
    dtype = devices.resolve_dtype("auto", torch.device("cpu"))
    model = tlora.attach(load_base(directory, dtype, "m").unwrap(), recipe, "m").unwrap()
    if parts:
        kernels.install(model.lm, parts)
    if not autocast:
        model._hidden = lambda inputs, positions: model.backbone(input_ids=inputs, position_ids=positions, use_cache=False).last_hidden_state
    model.train()
    opt = Optimizer(model.trainable(), recipe.train, 1000)

    def step(b):
        for p in opt.params.values():
            p.grad = None
        loss, _ = supervised_ce(model, *b)
        loss.backward()
        grads = {k: p.grad for k, p in opt.params.items()}
        torch._foreach_div_(list(grads.values()), float(b[3].sum()))
        clip_(grads, recipe.train.grad_clip)
        opt.update(grads)

    return step


def peft_step(directory: Path):
    """benchmarks/torch_engine.py's PEFT float32 reference: full logits, -100 labels, torch's AdamW."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    lm = get_peft_model(AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32),
                        LoraConfig(r=8, lora_alpha=160, target_modules="all-linear", lora_dropout=0.0))
    lm.train()
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0)

    def step(b):
        inputs, select, targets, weights = b
        n = int((weights > 0).sum())
        labels = torch.full((inputs.numel(),), -100)
        labels[select[:n]] = targets[:n]
        logits = lm(input_ids=inputs).logits.reshape(-1, lm.config.vocab_size)
        (F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum") / n).backward()
        opt.step()
        opt.zero_grad()

    return step


@contextlib.contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def variant(name: str, directory: Path):
    if name == "peft":
        return peft_step(directory)
    if name == "engine-1thread":
        step = engine_step(directory, ())

        def one(b):
            with threads(1):
                step(b)

        return one
    extra = name.removeprefix("engine").removesuffix("-noautocast").removeprefix("+")
    parts = kernels.PARTS if extra == "kernels" else tuple(x for x in extra.split("+") if x)
    return engine_step(directory, parts, autocast=not name.endswith("-noautocast"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm", choices=sorted(MODELS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--variants", default="peft,engine,engine+kernels")
    p.add_argument("--profile", default="", help="print a torch.profiler table of two steps of this variant instead")
    p.add_argument("--model-dir", default="", help="reuse a model written by an earlier run")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(a.model_dir) if a.model_dir else write_model(a.model, Path(tmp))
        data = batches(directory, a.batch, a.steps + 2)
        names = [a.profile] if a.profile else a.variants.split(",")
        steps = {n: variant(n, directory) for n in names}
        for b in data[:2]:  # warm-up
            for s in steps.values():
                s(b)
        if a.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for b in data[2:4]:
                    steps[a.profile](b)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
            return
        wall, cpu = ({n: [] for n in names} for _ in range(2))
        for i, b in enumerate(data[2:]):
            for n in names[i % len(names):] + names[: i % len(names)]:  # rotate who goes first
                t, c = time.perf_counter(), time.process_time()
                steps[n](b)
                wall[n].append(time.perf_counter() - t)
                cpu[n].append(time.process_time() - c)
    ref = names[0]
    print(f"{a.model} b{a.batch}, {a.steps} steps each, load average {os.getloadavg()[0]:.1f}, "
          f"{torch.get_num_threads()} threads; speed-up = median over batches of {ref}'s time / the variant's")
    for n in names:
        sw = statistics.median(x / y for x, y in zip(wall[ref], wall[n], strict=True))
        sc = statistics.median(x / y for x, y in zip(cpu[ref], cpu[n], strict=True))
        print(f"{n:16s} wall {statistics.median(wall[n]):6.2f} s  cpu {statistics.median(cpu[n]):6.2f} s  "
              f"speed-up vs {ref}: wall {sw:.2f}x  cpu {sc:.2f}x", flush=True)


if __name__ == "__main__":
    main()
