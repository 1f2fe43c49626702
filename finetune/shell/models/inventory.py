"""What models this machine has (`ft models list`) and what one of them is (`ft models info`)."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
from msgspec import Struct
from returns.result import Failure, Result, Success

from finetune.core import memory, modelinfo
from finetune.core.config import Recipe
from finetune.files import manager, sources, tiny, weights

DEMO_NOTE = "pipeline demo: random weights from a fixed seed, not a useful language model"


class Row(Struct, frozen=True, kw_only=True):
    name: str
    architecture: str
    parameters: int
    dtype: str
    size: int  # bytes on disk, 0 when not on disk yet
    kind: str  # "built-in", "converted", "gguf" (a .gguf file's conversion) or "hf-cache"
    where: str  # the directory
    note: str = ""


class Info(Struct, frozen=True, kw_only=True):
    name: str
    directory: str
    facts: modelinfo.ModelFacts
    parameters: int
    dtype: str  # as stored in the checkpoint
    load_dtype: str  # what `load(..., dtype="auto")` gives on this machine
    size: int
    chat_template: bool
    memory: memory.MemoryEstimate
    converted: tuple[str, ...]  # cache entries of this source
    note: str = ""
    quantization: str = ""  # mlx-lm quantization summary, "" for float weights
    device: str = "cpu"  # where `load_dtype` was decided (cpu or gpu)


def dir_size(directory: Path) -> int:
    """Bytes of every file below `directory` (symlinks into the HF blob store followed)."""
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def _config(directory: Path) -> dict | None:
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def stored_dtype(directory: Path, config: dict) -> str:
    return str(
        weights.checkpoint_dtype(directory)
        or config.get("torch_dtype")
        or config.get("dtype")
        or "float32"
    )


def parameters(directory: Path, facts: modelinfo.ModelFacts) -> int:
    """Exact count from safetensors headers, else the estimate from the config."""
    return weights.parameter_count(directory) or facts.parameters


def _row(name: str, directory: Path, kind: str, note: str = "") -> Row | None:
    config = _config(directory)
    if config is None or "auto_map" in config:
        return None
    match modelinfo.facts(config):
        case Success(facts):
            return Row(
                name=name,
                architecture=facts.model_type,
                parameters=parameters(directory, facts),
                dtype=stored_dtype(directory, config),
                size=dir_size(directory),
                kind=kind,
                where=str(directory),
                note=note,
            )
    return None


def _hub_rows() -> list[Row]:
    from huggingface_hub import scan_cache_dir

    try:
        repos = scan_cache_dir(sources.hub_cache_dir()).repos
    except Exception:  # no cache directory yet, or one huggingface_hub cannot read
        return []
    rows = []
    for repo in sorted(repos, key=lambda r: r.repo_id):
        revisions = list(repo.revisions)
        if repo.repo_type != "model" or not revisions:
            continue
        main = [r for r in revisions if "main" in r.refs]
        rev = main[0] if main else max(revisions, key=lambda r: r.last_modified)
        name = repo.repo_id if main else f"{repo.repo_id}@{rev.commit_hash[:8]}"
        if row := _row(name, Path(rev.snapshot_path), "hf-cache"):
            rows.append(row)
    return rows


def list_models() -> list[Row]:
    """`tiny`, converted-cache entries, and supported models in the local HF cache."""
    rows = []
    if (tiny.tiny_dir() / "config.json").is_file():
        rows.append(_row("tiny", tiny.tiny_dir(), "built-in", DEMO_NOTE))
    else:
        facts = modelinfo.facts(tiny.CONFIG).unwrap()
        rows.append(
            Row(
                name="tiny",
                architecture="llama",
                parameters=facts.parameters,
                dtype="float32",
                size=0,
                kind="built-in",
                where="(built on first use)",
                note=DEMO_NOTE,
            )
        )
    for entry, m in manager.entries():
        stale = "" if manager.is_fresh(m) else "stale: source changed or gone"
        rows.append(
            Row(
                name=m.source,
                architecture=m.model_type,
                parameters=m.parameters,
                dtype=m.dtype,
                size=dir_size(entry),
                kind="converted",
                where=str(entry),
                note=stale,
            )
        )
    return [r for r in rows if r is not None] + _gguf_rows() + _hub_rows()


def _gguf_rows() -> list[Row]:
    """Conversions of .gguf files used as MODEL (`$FINETUNE_HOME/models/gguf/`), named by their file."""
    from finetune.files.paths import cache_root

    root = cache_root() / "models" / "gguf"  # files.gguf.cache_dir's parent
    found = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")) if root.is_dir() else []
    rows = []
    for directory in found:
        try:
            source = json.loads((directory / "gguf_source.json").read_text(encoding="utf-8"))
            path, size = Path(source["source"]), int(source["size"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a finished conversion
        if row := _row(str(path), directory, "gguf"):
            kinds = [t for t in source.get("tensor_types", {}).values() if t != "F32"]
            kind = max(set(kinds), key=kinds.count) if kinds else "F32"
            note = f"from a {size / 1e6:.1f} MB {kind} GGUF file"
            if not _same_file(path, source):
                note += "; stale: the file changed or is gone (using it converts it again)"
            rows.append(msgspec.structs.replace(row, note=note))
    return rows


def _same_file(path: Path, source: dict) -> bool:
    try:
        st = path.stat()
    except OSError:
        return False
    return (st.st_size, st.st_mtime_ns) == (source.get("size"), source.get("mtime_ns"))


def has_chat_template(directory: Path) -> bool:
    if any((directory / n).is_file() for n in ("chat_template.jinja", "chat_template.json")):
        return True
    try:
        config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and bool(config.get("chat_template"))


def info(spec: str, revision: str = "main", gpu: bool | None = None, engine: str = "mlx") -> Result[Info, str]:
    """Config summary, sizes and a LoRA memory estimate at the default recipe, without weights.

    `gpu`: whether the engine computes on a GPU (None: ask MLX where it computes now).
    `engine="torch"`: architectures outside the MLX engine's are read through transformers.
    """
    from finetune import engines
    from finetune.files.models import model_config, resolve_dtype

    match model_config(spec, revision, any_architecture=engine == "torch"):
        case Success((directory, config)):
            pass
        case failure:
            return failure
    if engine == "torch" and config.get("model_type") not in modelinfo.SUPPORTED:
        facts_of = engines.get("torch").facts(directory, spec, config)
    else:
        facts_of = modelinfo.facts(config)
    match facts_of:
        case Success(facts):
            pass
        case Failure(message):
            return Failure(f"{spec}: {message}")
    from finetune.core.quantization import from_config

    quant = from_config(config).value_or(None)  # check_config has validated it
    stored = stored_dtype(directory, config)
    gpu = engines.get("mlx").uses_gpu() if gpu is None else gpu
    load_dtype = resolve_dtype("auto", stored, gpu)
    source = str(directory.resolve())
    return Success(
        Info(
            name=spec,
            directory=str(directory),
            facts=facts,
            parameters=parameters(directory, facts),
            dtype=stored,
            load_dtype=load_dtype,
            size=dir_size(directory),
            chat_template=has_chat_template(directory),
            memory=memory.estimate(facts, Recipe(), dtype=load_dtype),
            converted=tuple(str(e) for e, m in manager.entries() if m.directory == source),
            note=DEMO_NOTE if directory.resolve() == tiny.tiny_dir().resolve() else "",
            quantization=quant.summary() if quant else "",
            device="gpu" if gpu else "cpu",
        )
    )
