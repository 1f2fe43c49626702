"""The torch engine's estimated vs measured peak memory, and the fit of its copy counts.

Each point runs in a fresh process: a transformers Llama of the given shape with random weights,
peak LoRA attached by the engine (`engines/torch/lora.attach`), two steps of the real loop
(`shell/training/loop.run_steps` over `engines/torch/step.Trainer`) on synthetic rows of a fixed
padded length. The peak is
the process's resident high-water mark (VmHWM) after a reset once the weights, the adapters and
Adam's state are in memory, so `measured - resident at the reset` is what the steps add; it is
compared with the estimate's activations plus the adapters' gradients.

    python benchmarks/torch_memory.py [--grid quick|fit|full] [--fit]

`--grid full`: a full fine-tune (`engines/torch/full.attach`, the last blocks' every weight in
float32) of the same shape, float32 and bfloat16 bases, where the steps also add the trained
weights' gradients and the update's temporary (`sqrt(v)`); it checks the estimate, it is not part
of the fit.

`--fit` prints the least-squares copy counts (`engines/torch/budget.COPIES`, `FIXED_GB`) over the grid.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

SMOLLM = {
    "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
}
# (layers, batch, padded length, checkpointing, supervised share[, fine-tune type, dtype, trained layers])
GRIDS = {
    "quick": [(30, 4, 128, False, 1.0), (30, 4, 128, True, 1.0), (30, 8, 256, False, 0.5),
              (30, 4, 128, False, 1.0, "lora", "bfloat16"), (30, 8, 256, True, 0.5, "lora", "bfloat16")],
    "fit": [(layers, b, s, c, 1.0) for layers in (2, 6) for b, s in ((2, 128), (8, 128), (4, 512)) for c in (False, True)],
    "full": [(6, b, s, c, 1.0, "full", d, n) for d in ("float32", "bfloat16") for b, s, c, n in
             ((4, 128, False, -1), (8, 256, False, -1), (8, 256, True, -1), (4, 512, False, 2))],
}


def point(layers: int, batch: int, seq: int, checkpoint: bool, supervised: float, kind: str = "lora",
          dtype: str = "float32", trained: int = -1) -> dict:
    """One measurement in this process (call it in a fresh one)."""
    import msgspec
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune.core import batching, memory, modelinfo
    from finetune.core.config import Recipe
    from finetune.core.tokenize import Tokens
    from finetune.engines.protocol import Data
    from finetune.engines.torch import budget
    from finetune.engines.torch import full as tfull
    from finetune.engines.torch import lora as tmodel
    from finetune.engines.torch import step as ttrain
    from finetune.shell.training import loop, rundir

    torch.manual_seed(0)
    config = {**SMOLLM, "num_hidden_layers": layers}
    lora = {"dropout": 0.0} if kind == "lora" else {"fine_tune_type": kind, "num_layers": trained}
    recipe = msgspec.convert({"lora": lora, "train": {
        "batch_size": batch, "iters": 2, "grad_checkpoint": checkpoint, "max_seq_length": 4096,
        "eval_every": 0, "save_every": 0, "report_every": 1}}, Recipe)
    lm = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"}, attn_implementation="sdpa")).eval()
    lm = lm.to(getattr(torch, dtype))
    model = (tfull if kind == "full" else tmodel).attach(lm, recipe, "random").unwrap()
    if checkpoint:
        model.lm.activation_checkpointing_enable({"use_reentrant": False})
    n, vocab = seq + 1, config["vocab_size"]
    start = n - max(1, int(seq * supervised))
    rows = [Tokens(tuple((7 * i + 13 * t) % vocab for t in range(n)), tuple(int(t >= start) for t in range(n)))
            for i in range(batch * 2)]
    data = Data(rows, batching.length_sorted([len(r.ids) for r in rows], batch))
    device = torch.device("cpu")
    optimizer = ttrain.Optimizer(model.trainable(), recipe.train, 2)
    budget.reset_peak(device)
    resident = budget.process_gb(device)
    loop.run_steps(ttrain.Trainer(model, optimizer, recipe.train, device), data, None, recipe.train, 2, rundir.Cursor(),
                   on_report=lambda r: None, on_save=lambda c: None, on_log=lambda line: None)
    added = budget.peak_gb(device) - resident
    facts = modelinfo.facts(config).unwrap()
    chosen = 64 * -(-batch * max(1, int(seq * supervised)) // 64)
    r = msgspec.structs.replace(recipe, train=msgspec.structs.replace(recipe.train, grad_checkpoint=checkpoint))
    terms = memory.activation_terms(facts, r, batch, seq, chosen)
    est = memory.estimate(facts, r, seq, dtype, chosen, batch, copies=budget.COPIES, trained_dtype=budget.TRAINED,
                          activation_bytes=budget.activation_bytes(dtype))
    # what a step adds to the trained state (Adam's zeroed moments are resident before): the gradients,
    # and for a full fine-tune also the update's temporary (`sqrt(v)`), both float32
    grads = memory.trainable_parameters(facts, r) * 4 * (2 if kind == "full" else 1) / memory.GB
    return {"layers": layers, "batch": batch, "seq": seq, "checkpoint": checkpoint, "supervised": supervised,
            "kind": kind, "dtype": dtype, "trained": trained,
            "terms": terms, "added_gb": added, "estimate_added_gb": est.activations_gb + grads + budget.FIXED_GB, "grads_gb": grads}


def measure(p: tuple) -> dict:
    code = f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import torch_memory as t; print(json.dumps(t.point(*{p!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=1200)
    return json.loads(out.stdout.strip().splitlines()[-1])


def fit(results: list[dict]) -> dict[str, float]:
    """Non-negative least squares of the added GB over the terms and a constant (`fixed_gb`: what
    the first steps allocate once), relative errors weighing each point alike."""
    import numpy as np

    from finetune.core import memory

    keys = [k for k in results[0]["terms"] if any(r["terms"][k] for r in results)]
    a = np.array([[r["terms"][k] * 4 / memory.GB for k in keys] + [1.0] for r in results])
    b = np.array([r["added_gb"] - r["grads_gb"] for r in results])
    w = 1 / np.array([r["added_gb"] for r in results])
    names, active = [*keys, "fixed_gb"], list(range(len(keys) + 1))
    while True:  # drop the most negative coefficient until none is
        coef = np.linalg.lstsq(a[:, active] * w[:, None], b * w, rcond=None)[0]
        if coef.min() >= 0:
            break
        active.pop(int(coef.argmin()))
    return {names[i]: round(float(c), 3) for i, c in zip(active, coef, strict=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", choices=tuple(GRIDS), default="quick")
    parser.add_argument("--fit", action="store_true")
    parser.add_argument("--save", default="", help="write the measured points to this JSON file")
    args = parser.parse_args()
    print("| type, dtype | layers (trained) | batch | padded length | checkpointing | supervised | estimate GB | measured GB | error |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = []
    for p in GRIDS[args.grid]:
        r = measure(p)
        results.append(r)
        err = r["estimate_added_gb"] / r["added_gb"] - 1
        trained = "" if r["kind"] == "lora" or r["trained"] < 0 else f" ({r['trained']})"
        print(f"| {r['kind']}, {r['dtype']} | {r['layers']}{trained} | {r['batch']} | {r['seq']} | {'on' if r['checkpoint'] else 'off'} | {r['supervised']:.0%} | "
              f"{r['estimate_added_gb']:.3f} | {r['added_gb']:.3f} | {err:+.1%} |", flush=True)
    if args.fit:
        coef = fit(results)
        print("\nfitted copies:", coef)
        for r in results:  # each point under the fitted counts
            from finetune.core import memory

            got = sum(coef.get(k, 0.0) * v * 4 / memory.GB for k, v in r["terms"].items()) + coef.get("fixed_gb", 0.0)
            print(f"  {r['layers']} layers, {r['batch']}x{r['seq']}, checkpointing {'on' if r['checkpoint'] else 'off'}: "
                  f"{got + r['grads_gb']:.3f} vs {r['added_gb']:.3f} GB ({(got + r['grads_gb']) / r['added_gb'] - 1:+.1%})")
    if args.save:
        Path(args.save).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
