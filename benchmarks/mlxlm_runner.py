"""Run `mlx_lm lora` exactly as its CLI does, printing each report as a JSON line.

mlx-lm's `run()` replaces any callback passed to it, so this mirrors its `main()`/`run()`
with the same functions and defaults and adds a callback. Arguments are mlx-lm's.
"""

from __future__ import annotations

import json
import sys
import types

import mlx.core as mx
import numpy as np
from mlx_lm import lora
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.tuner.datasets import load_dataset
from mlx_lm.utils import load


class Reports(TrainingCallback):
    def on_train_loss_report(self, info: dict) -> None:
        print("REPORT " + json.dumps({k: float(v) for k, v in info.items()}), flush=True)

    def on_val_loss_report(self, info: dict) -> None:
        pass


def main(argv: list[str]) -> None:
    args = vars(lora.build_parser().parse_args(argv))
    for k, v in lora.CONFIG_DEFAULTS.items():
        if args.get(k) is None:
            args[k] = v
    args = types.SimpleNamespace(**args)
    np.random.seed(args.seed)
    model, tokenizer = load(args.model)
    train_set, valid_set, _ = load_dataset(args, tokenizer)
    lora.train_model(args, model, train_set, valid_set, Reports())
    print(f"PEAK {mx.get_peak_memory() / 1e9}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
