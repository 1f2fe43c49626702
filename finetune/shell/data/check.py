"""`ft train validate`: read the recipe's data and model, run the pure checks, gather a report."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from msgspec import Struct
from returns.result import Failure, Result, Success

from finetune.core import architectures, memory, memplan, modelinfo, prepare, templates, validate
from finetune.core import recipe as core_recipe
from finetune.core.config import Recipe
from finetune.core.records import RowError, Sample
from finetune.core.tokenize import Tokens
from finetune.files import datasets, sources


class FileError(Struct, frozen=True):
    file: str
    error: RowError

    def __str__(self) -> str:
        return f"{self.file}:{self.error.line}: {self.error.kind}: {self.error.message}"


class ValidationReport(Struct, frozen=True, kw_only=True):
    recipe: Recipe
    files: dict[str, str]  # split -> path
    splits: dict[str, prepare.SplitStats]
    row_errors: list[FileError]
    findings: list[validate.Finding]
    templates: dict[str, str]  # format -> template used
    model: str = ""
    facts: modelinfo.ModelFacts | None = None
    estimate: memory.MemoryEstimate | None = None
    seq_len: int = 0  # the padded batch length the estimate assumes

    @property
    def ok(self) -> bool:
        return not any(f.level == "error" for f in self.findings)


class Tokenizing(Struct, frozen=True):
    tokenizer: Any
    chat_template: str


class SplitData(Struct, frozen=True):
    """One split file read, checked and (with a tokenizer) encoded; errors sorted by line."""

    rows: int
    samples: list[tuple[int, Sample]]
    encoded: list[prepare.Encoded]
    errors: list[RowError]


def read_split(recipe: Recipe, path: Path, tok: Tokenizing | None, chosen: dict[str, str]) -> SplitData:
    """Read -> normalise -> render and tokenize, keeping every bad row (for validate and train)."""
    rows, read_errors = datasets.read_rows(path)
    samples, shape_errors = prepare.normalise_rows(rows, recipe.data.format)
    encoded, template_errors = encode_split(recipe, samples, tok, chosen)
    errors = sorted([*read_errors, *shape_errors, *template_errors], key=lambda e: e.line)
    return SplitData(len(rows) + len(read_errors), samples, encoded, errors)


class Inspection(Struct, frozen=True):
    """What `validate` reports, plus what training needs from the same reading: the tokenizer and
    every split's token sequences (rows with nothing to learn dropped)."""

    report: ValidationReport
    tokenizer: Any = None
    tokens: dict[str, list[Tokens]] = {}


def run(recipe: Recipe, available_gb: float = 0.0, engine: str = "mlx") -> Result[ValidationReport, str]:
    """Everything `validate` says; Failure only when the data cannot be found at all."""
    return inspect(recipe, available_gb, engine).map(lambda i: i.report)


def inspect(recipe: Recipe, available_gb: float = 0.0, engine: str = "mlx") -> Result[Inspection, str]:
    """Read the model's config and tokenizer (no weights) and every split; run the pure checks.

    `ft train validate` shows the report; `ft train start` and `finetune.train` stop on its errors
    and train on its tokens, so the two can never disagree. Defaults that depend on the model
    (`max_seq_length = 0`) are resolved here, and the report's recipe is the resolved one.
    With `engine="torch"`, architectures outside the registry are read through transformers.
    """
    located = datasets.locate(recipe.data.path)
    if isinstance(located, Failure):
        return located
    files = located.unwrap()
    model_findings: list[validate.Finding] = []
    facts, tok = None, None
    match _model(recipe, engine):
        case Success((facts_, tok_)):
            facts, tok = facts_, tok_
        case Failure(message):
            model_findings.append(validate.Finding("error", "$.model.path", message))
    recipe = core_recipe.against_model(recipe, facts.context_length if facts else None)
    chosen: dict[str, str] = {}
    splits: dict[str, prepare.SplitStats] = {}
    row_errors: list[FileError] = []
    tokens: dict[str, list[Tokens]] = {}
    for split, path in files.items():
        data = read_split(recipe, path, tok, chosen)
        row_errors += [FileError(str(path), e) for e in data.errors]
        tokens[split] = [e.tokens for e in data.encoded if e.tokens.supervised]
        splits[split] = (
            prepare.summarise(data.rows, data.encoded, data.errors, recipe.train.max_seq_length)
            if tok else prepare.summarise_untokenized(data.rows, data.samples, data.errors)
        )
    longest = max((s.length_max for s in splits.values()), default=0)
    seq_len = min(recipe.train.max_seq_length, -(-longest // 32) * 32) if longest else 0
    estimate = _estimate(facts, recipe, tokens.get("train"), seq_len) if facts else None
    findings = model_findings + validate.check(recipe, splits, facts, estimate, available_gb)
    report = ValidationReport(
        recipe=recipe, files={k: str(v) for k, v in files.items()}, splits=splits,
        row_errors=row_errors, findings=findings, templates=chosen,
        model=recipe.model.path, facts=facts, estimate=estimate, seq_len=seq_len,
    )
    return Success(Inspection(report, tok.tokenizer if tok else None, tokens))


def before_training(recipe: Recipe, available_gb: float, log: Callable[[str], None], engine: str = "mlx") -> Result[Inspection, str]:
    """What both engines run before loading weights: validate's checks, stopping on its errors
    (the same one line `refusal` gives) and logging its warnings."""
    match inspect(recipe, available_gb, engine):
        case Success(inspection):
            pass
        case Failure(message):
            return Failure(message)
    stop = refusal(inspection.report)
    if stop:
        return Failure(stop)
    for finding in inspection.report.findings:
        if finding.level == "warning":
            log(f"warning: {finding.field}: {finding.message}")
    return Success(inspection)


def refusal(report: ValidationReport) -> str | None:
    """The one line `ft train start` stops with when validate would exit 2, else None."""
    errors = [f for f in report.findings if f.level == "error"]
    if report.row_errors:
        first, n = report.row_errors[0], len(report.row_errors)
        more = f" (and {n - 1} more bad rows; `ft train validate` lists them all)" if n > 1 else ""
        return f"{first}{more}"
    if not errors:
        return None
    more = f" (and {len(errors) - 1} more; `ft train validate` lists them all)" if len(errors) > 1 else ""
    return f"{errors[0].field}: {errors[0].message}{more}"


def _estimate(facts: modelinfo.ModelFacts, recipe: Recipe, train: list[Tokens] | None, seq_len: int) -> memory.MemoryEstimate:
    """The peak of the largest batch the training plan will produce (its rows, length, targets)."""
    if not train:
        return memory.estimate(facts, recipe, seq_len)
    from finetune.engines.protocol import plan  # engine-free: validate runs without MLX

    rows, width, chosen = memplan.micro_shape(memplan.workload(plan(train, recipe), train, recipe.train.max_seq_length), 1)
    dtype = recipe.model.dtype if recipe.model.dtype in memory.BYTES else "float32"
    return memory.estimate(facts, recipe, width, dtype, chosen, rows)


def _model(recipe: Recipe, engine: str) -> Result[tuple[modelinfo.ModelFacts, Tokenizing], str]:
    from finetune.files.tokenizer import load_tokenizer

    def read_facts(directory: Path, config: dict) -> Result[modelinfo.ModelFacts, str]:
        if engine == "torch" and config.get("model_type") not in architectures.REGISTRY:
            from finetune import engines

            return engines.get("torch").facts(directory, recipe.model.path, config)
        return modelinfo.facts(config).alt(
            lambda m: f"{m}; the torch engine (--backend torch) trains any architecture transformers has"
            if "unsupported" in m and engine == "mlx" else m)

    def load(directory: Path) -> Result[tuple[modelinfo.ModelFacts, Tokenizing], str]:
        facts = sources.read_config(directory).bind(lambda config: read_facts(directory, config))
        try:
            tok = load_tokenizer(directory)
        except Exception as err:  # transformers raises OSError/ValueError/... for broken files
            return Failure(f"{directory}: cannot load the tokenizer ({type(err).__name__}: {err})")
        return facts.map(lambda f: (f, Tokenizing(tok, tok.chat_template or "")))

    return sources.model_dir(recipe.model.path, recipe.model.revision).bind(load)


def template_for(recipe: Recipe, fmt: str, chat_template: str) -> Result[templates.Template, str]:
    """The recipe's template for rows of `fmt` (a file path is read as Jinja)."""
    if fmt == "text":
        return Success("plain")  # text rows are trained as they are
    return read_template(recipe.data.template, fmt, chat_template, "$.data.template")


def read_template(name: str, fmt: str, chat_template: str, field: str) -> Result[templates.Template, str]:
    """A built-in name, `tokenizer`, Jinja text, or a file holding Jinja; errors name `field`."""
    if "{" not in name and Path(name).is_file():
        try:
            return templates.choose(name, fmt, chat_template, Path(name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as err:
            return Failure(f"{field}: cannot read template file {name} ({err})")
    if name.endswith((".jinja", ".j2")):
        return Failure(f"{field}: template file {name} not found")
    return templates.choose(name, fmt, chat_template)


def encode_split(recipe: Recipe, samples, tok: Tokenizing | None, chosen: dict[str, str]):
    """Render and tokenize one split's samples with the recipe's templates; records the choices."""
    if tok is None:
        return [], []
    from finetune.files.tokenizer import encoder, specials

    sp, enc = specials(tok.tokenizer), encoder(tok.tokenizer)
    picked: dict[str, templates.Template] = {}
    errors: list[RowError] = []
    for fmt in sorted({s.format for _, s in samples}):
        match template_for(recipe, fmt, tok.chat_template):
            case Success(t):
                picked[fmt] = t
                chosen[fmt] = _describe(t, fmt, tok.chat_template)
            case Failure(message):
                errors += [RowError(line, "template", message) for line, s in samples if s.format == fmt]
    usable = [(line, s) for line, s in samples if s.format in picked]
    encoded, render_errors = prepare.encode_samples(
        usable, picked, sp, enc, recipe.data.supervise, recipe.train.max_seq_length
    )
    return encoded, errors + render_errors


def _describe(t: templates.Template, fmt: str, chat_template: str) -> str:
    if fmt == "text":
        return "none (trained as-is)"
    if isinstance(t, str):
        return t
    return "tokenizer (the model's own)" if t.source == chat_template else "custom Jinja"
