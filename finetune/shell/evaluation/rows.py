"""A split's rows as evaluation cases: read, normalise, render as the adapter's training did, split.

A FineTune run renders with its recipe.toml. An adapter directory written by `mlx_lm lora` (no
recipe.toml; its adapter_config.json holds mlx-lm's training arguments) renders as mlx-lm trained
it: prompt/completion rows as a user and an assistant turn and chat rows through the tokenizer's
chat template, tokenized as the template writes them (no BOS added); text rows as they are, BOS
per the tokenizer, EOS appended; the loss on every token, or from the prompt's end with
--mask-prompt. Anything else renders with FineTune's defaults.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
from msgspec import Struct
from returns.result import Failure, Result, Success

from finetune.core import evaluation, prepare
from finetune.core.config import Recipe
from finetune.core.records import Message
from finetune.errors import UserError
from finetune.files import datasets
from finetune.shell.data import check


class Cases(Struct, frozen=True):
    """The rows to answer, what ends an answer, and how many rows had nothing to answer."""

    cases: list[evaluation.Case]
    stop_ids: tuple[int, ...]  # EOS and single-token end-of-turn markers
    stop_strings: tuple[str, ...]  # end-of-turn markers that take several tokens
    skipped: int  # rows with nothing to answer (a chat without an assistant turn)
    path: str


class MlxLm(Struct, frozen=True):
    """mlx-lm's rendering (`mlx_lm lora`'s datasets): the tokenizer's template as is."""

    mask_prompt: bool = False  # --mask-prompt: the loss from the prompt's end, else on every token


class Rendering(Struct, frozen=True, kw_only=True):
    """How one model's rows are rendered: the recipe, and mlx-lm's convention where it trained."""

    recipe: Recipe
    mlx_lm: MlxLm | None = None
    note: str = ""  # one line for the table and JSON

    @property
    def key(self) -> tuple:
        """Renderings with equal keys give the same cases."""
        train = self.recipe.train
        return (self.recipe.data, train.max_seq_length, train.answer_after, self.mlx_lm)


def split_file(data: str, split: str) -> Result[Path, str]:
    """The file of `split` in DATA (a bundled name or a split directory); a single file is itself."""
    match datasets.locate(data):
        case Success(files):
            pass
        case Failure(message):
            return Failure(message)
    if Path(data).expanduser().is_file():
        return Success(files["train"])
    if split not in files:
        return Failure(f"{data}: no {split} split (has: {', '.join(files)}); pick one with --split")
    return Success(files[split])


def read(recipe: Recipe, path: Path, tokenizer: Any, limit: int | None = None,
         answer_after: str | None = None, mlx_lm: MlxLm | None = None) -> Result[Cases, str]:
    """The first `limit` rows of `path` (all when None) that have an answer, as cases.

    Templates, supervision and truncation are the recipe's (as training renders the rows), or
    mlx-lm's (`mlx_lm`); text rows split at `answer_after` (default: the recipe's). Bad rows fail
    with file and line.
    """
    from finetune.files.tokenizer import encoder, specials
    from finetune.shell.generation import build_prompt, decoder

    rows, read_errors = datasets.read_rows(path)
    samples, shape_errors = prepare.normalise_rows(rows, recipe.data.format)
    errors = sorted([*read_errors, *shape_errors], key=lambda e: e.line)
    if errors:
        return Failure(f"{path}:{errors[0].line}: {errors[0].kind}: {errors[0].message}")
    sp, encode, decode = specials(tokenizer), encoder(tokenizer), decoder(tokenizer)
    chat_template = tokenizer.chat_template or ""
    # mlx-lm tokenizes the template's text as it is: a BOS only where the template writes one
    templated = msgspec.structs.replace(sp, add_bos=False) if mlx_lm else sp
    marker = recipe.train.answer_after if answer_after is None else answer_after
    picked: dict[str, Any] = {}
    cases: list[evaluation.Case] = []
    skipped = 0
    stop_ids: dict[int, None] = {}
    stop_strings: dict[str, None] = {}
    for line, sample in samples:
        if limit is not None and len(cases) >= limit:
            break
        if sample.format not in picked:
            if mlx_lm and sample.format != "text" and not chat_template:
                return Failure(f"{path}:{line}: mlx-lm renders {sample.format} rows with the tokenizer's chat "
                               "template, and this model's tokenizer has none")
            match check.template_for(recipe, sample.format, chat_template):
                case Success(t):
                    picked[sample.format] = t
                case Failure(message):
                    return Failure(f"{path}:{line}: {message}")
            stops = build_prompt(tokenizer, messages=(Message("user", "x"),), template=picked[sample.format]).unwrap()
            stop_ids.update(dict.fromkeys(stops.stop_ids))
            stop_strings.update(dict.fromkeys(stops.stop_strings))
        made = evaluation.case(line, sample, picked[sample.format], sp if sample.format == "text" else templated,
                               encode, decode, answer_after=marker, supervise=recipe.data.supervise,
                               max_length=recipe.train.max_seq_length)
        match made:
            case Success(c) if mlx_lm:
                start = len(c.prompt) if mlx_lm.mask_prompt and sample.format != "text" else 0
                cases.append(msgspec.structs.replace(c, tokens=evaluation.supervise_from(c.tokens, start)))
            case Success(c):
                cases.append(c)
            case Failure(error) if error.kind == "empty":
                skipped += 1
            case Failure(error):
                return Failure(f"{path}:{error.line}: {error.message}")
    return Success(Cases(cases, tuple(stop_ids), tuple(stop_strings), skipped, str(path)))


def rendering_for(data: str, adapter: str | None, model_context: int | None = None) -> Rendering:
    """How `adapter`'s training rendered rows (the base alone: FineTune's defaults); DATA is ours.

    A recipe.toml beside the adapters is FineTune's run recipe; else an adapter_config.json with
    mlx-lm's training arguments means `mlx_lm lora` trained it; else FineTune's defaults.
    """
    from finetune.core import recipe as core_recipe
    from finetune.shell import recipes

    base, mlx_lm, note = Recipe(), None, ""
    folder = Path(adapter) if adapter else None
    if folder is not None and (folder / "recipe.toml").is_file():
        match recipes.load(folder / "recipe.toml"):
            case Success(found):
                base, note = found, "recipe.toml"
            case Failure(message):
                raise UserError(message)
    elif folder is not None and (trained := mlx_lm_arguments(folder)) is not None:
        mlx_lm = MlxLm(mask_prompt=trained["mask_prompt"] is True)
        length = trained.get("max_seq_length")
        base = msgspec.structs.replace(
            base, data=msgspec.structs.replace(base.data, format="mlx", template="tokenizer", supervise="all"),
            train=msgspec.structs.replace(base.train, max_seq_length=length if isinstance(length, int) and length > 0 else 2048))
        loss = "from the prompt's end (--mask-prompt)" if mlx_lm.mask_prompt else "on every token"
        note = f"mlx-lm: tokenizer chat template, loss {loss}"
    else:
        note = "FineTune defaults" + (" (no recipe.toml)" if folder is not None else "")
    if not mlx_lm:
        note += f": template {base.data.template}, supervise {base.data.supervise}"
    with_data = msgspec.structs.replace(base, data=msgspec.structs.replace(base.data, path=data))
    return Rendering(recipe=core_recipe.against_model(with_data, model_context), mlx_lm=mlx_lm, note=note)


def mlx_lm_arguments(folder: Path) -> dict[str, Any] | None:
    """The training arguments `mlx_lm lora` saved in adapter_config.json (`vars(args)`: always with
    mask_prompt, which FineTune never writes), or None for any other adapter directory."""
    try:
        raw = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if isinstance(raw, dict) and "lora_parameters" in raw and isinstance(raw.get("mask_prompt"), bool):
        return raw
    return None


def plan(data: str, adapters: Sequence[str]) -> list[tuple[str, str | None, Rendering]]:
    """What `ft eval` scores, in order: (name, adapter or None for the base, rendering).

    The base is rendered as its adapters were: once when they agree (or none is given), else once
    per distinct rendering, named `base (as NAME)` after the first adapter rendered that way.
    """
    rendered = [(a, rendering_for(data, a)) for a in adapters]
    groups: dict[tuple, tuple[str, Rendering]] = {}
    for a, r in rendered:
        groups.setdefault(r.key, (a, r))
    if len(groups) <= 1:
        bases = [("base", None, rendered[0][1] if rendered else rendering_for(data, None))]
    else:
        bases = [(f"base (as {Path(a).name})", None, r) for a, r in groups.values()]
    return [*bases, *((a, a, r) for a, r in rendered)]
