"""Frozen configuration Structs: the one shape of a recipe, a CLI call and a resolved run.

Every field has a default that TOML can express (no `None`); `0` or `""` mean "not set" where a
field is optional. Bounds live in `Meta` so a bad value is reported with its path (`$.train.iters`).
Each field's `Meta(description=...)` is also its `ft train start/quick` flag's help, and
`Meta(extra={"flag": ...})` names that flag where the default rule does not (`core/flags.py`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, Struct

DataFormat = Literal["auto", "chat", "text", "completions", "instruction", "mlx"]
Supervise = Literal["assistant", "last-turn-only", "all"]
Schedule = Literal["constant", "cosine", "linear"]
Optimizer = Literal["adamw", "adam"]
Dtype = Literal["auto", "float32", "float16", "bfloat16"]
Profile = Literal["none", "chat", "instruction", "code"]
FineTuneType = Literal["lora", "dora", "full"]

BUILTIN_TEMPLATES = ("auto", "plain", "alpaca", "chatml", "llama2", "llama3", "tokenizer")
ALL_LINEAR = "all-linear"


def _field(description: str, flag: str = "", aliases: tuple[str, ...] = (), **bounds) -> Meta:
    """A field's bounds, its help text and (when not the default rule's) its flag names."""
    extra = {k: v for k, v in (("flag", flag), ("aliases", aliases)) if v}
    return Meta(description=description, extra=extra or None, **bounds)


class _Config(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base: immutable, unknown fields refused, keyword-only."""


class ModelConfig(_Config):
    """Which base model to load and how."""

    path: Annotated[str, _field("Local HF dir, hub id (local HF cache) or tiny.", flag="model", min_length=1)] = "tiny"
    revision: Annotated[str, _field("Hub revision (branch, tag or commit) of a hub id.", min_length=1)] = "main"
    dtype: Annotated[Dtype, _field("Base weights dtype; auto: on the MLX engine float32 on the CPU and the checkpoint's own on a GPU, on the torch engine bfloat16 where bf16 is native (CUDA, CPUs with AVX512_BF16/AMX) else float32.")] = "auto"
    quantize_bits: Annotated[Literal[0, 4, 8], _field("Quantize a float base to 4 or 8 bits on load (QLoRA); 0 = keep it.")] = 0
    quantize_group_size: Annotated[Literal[32, 64, 128], _field("Group size of that quantization.")] = 64


class DataConfig(_Config):
    """Where the data is and how rows become token sequences."""

    path: Annotated[str, _field("Bundled dataset name, .jsonl/.json file, or directory with train/valid/test.jsonl.", flag="data", min_length=1)] = "sql"
    format: Annotated[DataFormat, _field("Row format: auto (each row's by its keys), one format for every row, or mlx (mlx-lm's formats only: chat, completions, text, each row's by its keys; instruction rows refused).")] = "auto"
    template: Annotated[str, _field("Template: auto, plain, alpaca, chatml, llama2, llama3, tokenizer, a Jinja string or a file.", min_length=1)] = "auto"
    supervise: Annotated[Supervise, _field("Tokens that carry loss: every assistant turn, the last one, or all.")] = "assistant"
    packing: Annotated[bool, _field("Pack several rows per sequence with per-document attention.")] = False


class LoRAConfig(_Config):
    """Low-rank adapters: `y = W x + scale * (x A) B` (mlx-lm's convention)."""

    rank: Annotated[int, _field("Rank of the adapters.", ge=1, le=4096)] = 8
    scale: Annotated[float, _field("Multiplier of the low-rank update (mlx-lm's scale).", gt=0.0, le=1e6)] = 20.0
    alpha: Annotated[float, _field("Alternative to --lora-scale: scale = alpha / rank (0 = unset).", ge=0.0, le=1e6)] = 0.0
    dropout: Annotated[float, _field("Dropout on the adapters' input.", flag="dropout", aliases=("lora-dropout",), ge=0.0, lt=1.0)] = 0.0
    num_layers: Annotated[int, _field("Adapt the last N blocks (-1 = all); full: train every weight of the last N blocks.", flag="lora-layers", ge=-1)] = -1
    keys: Annotated[
        tuple[Annotated[str, Meta(min_length=1)], ...],
        _field("Linear layers to adapt, comma-separated key paths (self_attn.q_proj,...) or all-linear."),
    ] = (ALL_LINEAR,)
    fine_tune_type: Annotated[FineTuneType, _field("Fine-tune type: lora, dora (LoRA with a learned magnitude per output row; mlx-lm's and PEFT's DoRA), or full (every weight of the last --lora-layers blocks trained, as mlx-lm's full; the run also saves a HuggingFace model in RUN/model).", flag="fine-tune-type")] = "lora"

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

    iters: Annotated[int, _field("Optimizer steps (instead of --epochs).", ge=0)] = 1000
    epochs: Annotated[int, _field("Passes over the training rows (instead of --iters).", ge=0)] = 0
    batch_size: Annotated[int, _field("Rows per batch; under a memory limit the planner may train a batch as several micro-steps (same effective batch).", ge=1)] = 4
    grad_accumulation: Annotated[int, _field("Batches per optimizer step (token-weighted).", ge=1)] = 1
    learning_rate: Annotated[float, _field("Peak learning rate.", gt=0.0, le=10.0)] = 1e-4
    min_learning_rate: Annotated[float, _field("Learning rate at the end of a cosine or linear decay.", ge=0.0, le=10.0)] = 0.0
    optimizer: Annotated[Optimizer, _field("Optimizer: adamw or adam.")] = "adamw"
    weight_decay: Annotated[float, _field("AdamW's decoupled weight decay.", ge=0.0, le=10.0)] = 0.0
    schedule: Annotated[Schedule, _field("Learning-rate decay after the warmup.")] = "cosine"
    warmup: Annotated[int, _field("Steps of linear warmup.", ge=0)] = 0
    grad_clip: Annotated[float, _field("Largest global gradient norm (0 = no clipping).", ge=0.0, le=1e9)] = 1.0
    max_seq_length: Annotated[int, _field("Longest sequence in tokens; longer rows are truncated (0 = the model's context, at most 2048).", ge=0, le=1_048_576)] = 0
    report_every: Annotated[int, _field("Steps between log lines and metrics rows.", ge=1)] = 10
    eval_every: Annotated[int, _field("Steps between validation losses (0 = only at the end).", ge=0)] = 200
    val_batches: Annotated[int, _field("Validation batches per evaluation (-1 = the whole valid split).", ge=-1)] = 25
    save_every: Annotated[int, _field("Steps between checkpoints (0 = only at the end).", ge=0)] = 100
    keep_checkpoints: Annotated[int, _field("Newest checkpoints kept.", ge=1)] = 3
    grad_checkpoint: Annotated[bool, _field("Recompute each block's activations in the backward pass (less memory).")] = False
    compile: Annotated[bool, _field("Torch engine: torch.compile the forward and backward (faster steps after a slow first one); the MLX engine always compiles.")] = False
    seed: Annotated[int, _field("Seed for LoRA init, batch order and dropout.", ge=0)] = 0
    eval_generate: Annotated[int, _field("At each validation, answer the first N valid rows by greedy decoding and record exact match (val_exact_match; 0 = off).", ge=0)] = 0
    answer_after: Annotated[str, _field("Text rows: the marker after which the answer begins (e.g. 'A: '), for --eval-generate and ft eval.")] = ""

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
        if 0 < self.max_seq_length < 8:
            raise ValueError("max_seq_length must be 0 (the model's context) or >= 8")


class Recipe(_Config):
    """A whole fine-tuning run."""

    name: Annotated[str, _field("Name of the run.", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")] = "run"
    profile: Annotated[Profile, _field("Defaults for chat, instruction or code data.")] = "none"
    output: Annotated[str, _field("Run directory.", min_length=1)] = "runs/run"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    lora: LoRAConfig = LoRAConfig()
    train: TrainingConfig = TrainingConfig()
