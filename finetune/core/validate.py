"""Compatibility checks between a recipe, its data and its model, with recommendations (pure)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

from msgspec import Struct

from finetune.core.config import ALL_LINEAR, Recipe
from finetune.core.memory import MemoryEstimate
from finetune.core.modelinfo import ModelFacts
from finetune.core.prepare import SplitStats

Level = Literal["error", "warning", "hint"]


class Finding(Struct, frozen=True):
    level: Level
    field: str
    message: str


def check(
    recipe: Recipe,
    splits: Mapping[str, SplitStats],
    facts: ModelFacts | None = None,
    memory: MemoryEstimate | None = None,
    available_gb: float = 0.0,
) -> list[Finding]:
    """Everything worth saying before training: errors first, then warnings, then hints."""
    found = [*_data(recipe, splits), *_model(recipe, facts, splits), *_budget(recipe, memory, available_gb)]
    order = {"error": 0, "warning": 1, "hint": 2}
    return sorted(found, key=lambda f: order[f.level])


def _data(recipe: Recipe, splits: Mapping[str, SplitStats]) -> list[Finding]:
    out: list[Finding] = []
    t = recipe.train
    for split, s in splits.items():
        bad = sum(s.errors.values())
        if bad:
            kinds = ", ".join(f"{n} {k}" for k, n in s.errors.items())
            out.append(Finding("error", "$.data.path", f"{split}: {bad} of {s.rows} rows are bad ({kinds}); fix or remove them"))
        if s.nothing_to_learn:
            out.append(Finding("warning", "$.data.supervise", f"{split}: {s.nothing_to_learn} rows have no supervised token (after truncation) and will be skipped"))
        if s.truncated:
            share = s.truncated / max(1, s.rows)
            target = _round_up(s.length_max if share > 0.05 else s.length_p95)
            out.append(Finding("warning", "$.train.max_seq_length", f"{split}: {s.truncated} rows ({share:.1%}) are longer than {t.max_seq_length} tokens and will be truncated; max_seq_length = {target} would fit {'all' if share > 0.05 else '95%'} of them"))
    train = splits.get("train")
    if train is None:
        return out
    if not train.usable:
        out.append(Finding("error", "$.data.path", "the train split has no usable rows"))
        return out
    if t.batch_size > train.usable:
        out.append(Finding("error", "$.train.batch_size", f"{t.batch_size} is more than the {train.usable} usable training rows; lower it"))
    elif t.batch_size * t.grad_accumulation > train.usable:
        out.append(Finding("warning", "$.train.grad_accumulation", f"batch_size × grad_accumulation = {t.batch_size * t.grad_accumulation} exceeds the {train.usable} training rows"))
    valid = splits.get("valid")
    if valid is None:
        out.append(Finding("warning", "$.data.path", "no valid split: validation loss will not be reported (add valid.jsonl)"))
    elif valid.usable < t.batch_size:
        out.append(Finding("warning", "$.train.batch_size", f"the valid split has {valid.usable} usable rows, fewer than one batch of {t.batch_size}"))
    per_epoch = math.ceil(train.usable / t.batch_size)
    if t.iters:
        epochs = t.iters * t.batch_size * t.grad_accumulation / train.usable
        out.append(Finding("hint", "$.train.iters", f"{t.iters} steps of {t.batch_size * t.grad_accumulation} rows cover {epochs:.2f} epochs of {train.usable} rows"))
    else:
        steps = math.ceil(per_epoch * t.epochs / t.grad_accumulation)
        out.append(Finding("hint", "$.train.epochs", f"{t.epochs} epochs of {train.usable} rows take {steps} optimizer steps"))
    if train.tokens and train.supervised_share < 0.1:
        out.append(Finding("hint", "$.data.supervise", f"only {train.supervised_share:.1%} of training tokens carry loss: most compute goes to prompts"))
    formats = set(train.formats)
    template = recipe.data.template
    if formats == {"text"} and template not in ("auto", "plain"):
        out.append(Finding("hint", "$.data.template", f"every row is plain text, trained as-is: template {template!r} is not used"))
    if "chat" in formats and template in ("alpaca", "plain"):
        out.append(Finding("warning", "$.data.template", f"{template!r} has no roles: chat rows are flattened; chatml or the model's own template fits chat data better"))
    if t.learning_rate > 1e-3:
        out.append(Finding("warning", "$.train.learning_rate", f"{t.learning_rate:g} is high for LoRA; 1e-5 to 2e-4 is typical"))
    return out


def _model(recipe: Recipe, facts: ModelFacts | None, splits: Mapping[str, SplitStats]) -> list[Finding]:
    if facts is None:
        return []
    out: list[Finding] = []
    t, lora = recipe.train, recipe.lora
    if t.max_seq_length > facts.context_length:
        out.append(Finding("error", "$.train.max_seq_length", f"{t.max_seq_length} exceeds the model's context of {facts.context_length} tokens"))
    if lora.num_layers > facts.num_layers:
        out.append(Finding("error", "$.lora.num_layers", f"{lora.num_layers} exceeds the model's {facts.num_layers} layers; use -1 for all"))
    known = facts.linear_shapes()
    unknown = [k for k in lora.keys if k != ALL_LINEAR and k not in known]
    if unknown:
        out.append(Finding("error", "$.lora.keys", f"{', '.join(unknown)} not in a {facts.model_type} block; choose from {ALL_LINEAR}, {', '.join(known)}"))
    if lora.rank > facts.hidden_size // 2:
        out.append(Finding("warning", "$.lora.rank", f"rank {lora.rank} is large for hidden size {facts.hidden_size}"))
    return out


def _budget(recipe: Recipe, memory: MemoryEstimate | None, available_gb: float) -> list[Finding]:
    if memory is None:
        return []
    out = []
    if available_gb and memory.total_gb > 0.9 * available_gb:
        fix = ("ft train start will split each batch into micro-steps to fit (--memory-limit); "
               "lower batch_size or max_seq_length" + ("" if recipe.train.grad_checkpoint else ", or set grad_checkpoint = true"))
        out.append(Finding("warning", "$.train.batch_size", f"estimated peak {memory.total_gb:.1f} GB is close to or above the {available_gb:.1f} GB available; {fix}"))
    return out


def _round_up(n: int, multiple: int = 32) -> int:
    return max(multiple, -(-n // multiple) * multiple)
