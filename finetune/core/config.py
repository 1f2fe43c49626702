"""Frozen configuration Structs: the one shape of a recipe, a CLI call and a resolved run.

Every field has a default that TOML can express (no `None`); `0` or `""` mean "not set" where a
field is optional. Bounds live in `Meta` so a bad value is reported with its path (`$.train.iters`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, Struct

PositiveInt = Annotated[int, Meta(ge=1)]
NonNegInt = Annotated[int, Meta(ge=0)]
NonNegFloat = Annotated[float, Meta(ge=0.0, le=1e9)]

DataFormat = Literal["auto", "chat", "text", "completions", "instruction"]
Supervise = Literal["assistant", "last-turn-only", "all"]
Schedule = Literal["constant", "cosine", "linear"]
Optimizer = Literal["adamw", "adam"]
Dtype = Literal["auto", "float32", "float16", "bfloat16"]
Profile = Literal["none", "chat", "instruction", "code"]

BUILTIN_TEMPLATES = ("auto", "plain", "alpaca", "chatml", "llama2", "llama3", "tokenizer")
ALL_LINEAR = "all-linear"


class _Config(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base: immutable, unknown fields refused, keyword-only."""


class ModelConfig(_Config):
    """Which base model to load and how."""

    path: Annotated[str, Meta(min_length=1)] = "tiny"  # local dir, hub id, or "tiny"
    revision: Annotated[str, Meta(min_length=1)] = "main"
    dtype: Dtype = "auto"  # auto: float32 on CPU, the checkpoint's dtype on GPU
    quantize_bits: Literal[0, 4, 8] = 0  # 0 = full precision base (4/8 = QLoRA)


class DataConfig(_Config):
    """Where the data is and how rows become token sequences."""

    path: Annotated[str, Meta(min_length=1)] = "sql"  # bundled name, file, or split directory
    format: DataFormat = "auto"  # auto-detected per row unless forced
    template: Annotated[str, Meta(min_length=1)] = "auto"  # a built-in name, Jinja text or a file
    supervise: Supervise = "assistant"  # which tokens carry loss
    packing: bool = False


class LoRAConfig(_Config):
    """Low-rank adapters: `y = W x + scale * (x A) B` (mlx-lm's convention)."""

    rank: Annotated[int, Meta(ge=1, le=4096)] = 8
    scale: Annotated[float, Meta(gt=0.0, le=1e6)] = 20.0
    alpha: Annotated[float, Meta(ge=0.0, le=1e6)] = 0.0  # 0 = unset; else scale = alpha / rank
    dropout: Annotated[float, Meta(ge=0.0, lt=1.0)] = 0.0
    num_layers: Annotated[int, Meta(ge=-1)] = -1  # last N blocks; -1 = all
    keys: tuple[Annotated[str, Meta(min_length=1)], ...] = (ALL_LINEAR,)

    def __post_init__(self) -> None:
        if self.num_layers == 0:
            raise ValueError("num_layers must be -1 (all) or >= 1, got 0")
        if not self.keys:
            raise ValueError("keys must name at least one module path or 'all-linear'")
        if self.alpha and abs(self.scale - self.alpha / self.rank) > 1e-9 * max(1.0, self.scale):
            raise ValueError(
                f"scale {self.scale} disagrees with alpha/rank = {self.alpha / self.rank}: "
                "give one of scale or alpha"
            )


class TrainingConfig(_Config):
    """Optimisation, schedule and cadence."""

    iters: NonNegInt = 1000  # optimizer steps; 0 when epochs is set
    epochs: NonNegInt = 0
    batch_size: PositiveInt = 4
    grad_accumulation: PositiveInt = 1
    learning_rate: Annotated[float, Meta(gt=0.0, le=10.0)] = 1e-4
    min_learning_rate: Annotated[float, Meta(ge=0.0, le=10.0)] = 0.0
    optimizer: Optimizer = "adamw"
    weight_decay: Annotated[float, Meta(ge=0.0, le=10.0)] = 0.0
    schedule: Schedule = "cosine"
    warmup: NonNegInt = 0  # steps of linear warmup
    grad_clip: NonNegFloat = 1.0  # max global grad norm; 0 = off
    max_seq_length: Annotated[int, Meta(ge=8, le=1_048_576)] = 2048
    report_every: PositiveInt = 10
    eval_every: NonNegInt = 200  # 0 = only at the end
    val_batches: Annotated[int, Meta(ge=-1)] = 25  # -1 = the whole valid split
    save_every: NonNegInt = 100  # 0 = only at the end
    keep_checkpoints: PositiveInt = 3
    grad_checkpoint: bool = False
    seed: NonNegInt = 0

    def __post_init__(self) -> None:
        if self.iters and self.epochs:
            raise ValueError(
                f"give iters or epochs, not both (iters={self.iters}, epochs={self.epochs})"
            )
        if not self.iters and not self.epochs:
            raise ValueError("one of iters or epochs must be >= 1")
        if self.min_learning_rate > self.learning_rate:
            raise ValueError("min_learning_rate must not exceed learning_rate")
        if self.val_batches == 0:
            raise ValueError("val_batches must be -1 (all) or >= 1, got 0")


class Recipe(_Config):
    """A whole fine-tuning run."""

    name: Annotated[str, Meta(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")] = "run"
    profile: Profile = "none"
    output: Annotated[str, Meta(min_length=1)] = "runs/run"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    lora: LoRAConfig = LoRAConfig()
    train: TrainingConfig = TrainingConfig()
