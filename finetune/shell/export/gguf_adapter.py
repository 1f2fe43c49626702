"""A LoRA adapter as a llama.cpp LoRA GGUF (`llama-cli --lora`, Ollama's ADAPTER, llama-cpp-python's
`lora_path`).

Each pair is named after the base's GGUF tensor (`blk.0.attn_q.weight.lora_a` / `.lora_b`) in
llama.cpp's shapes: `lora_a` (rank, in) and `lora_b` (out, rank) in NumPy order, i.e. PEFT's
`lora_A`/`lora_B`. llama.cpp scales by `adapter.lora.alpha / rank`, so alpha = our scale * rank.
Q/K pairs get the base's row permutation on `lora_b` (the update's rows are the weight's rows).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from msgspec import Struct
from returns.result import Failure, Result, Success

from finetune.core import dtypes
from finetune.core import gguf as core_gguf
from finetune.shell.export import gguf as gguf_export

ADAPTER_TYPES = ("f32", "f16")  # what llama.cpp applies directly as adapter weights


class WrittenAdapter(Struct, frozen=True, kw_only=True):
    output: str
    architecture: str
    pairs: int
    rank: int
    alpha: float
    size: int


def adapter_tensors(arch: str, config: dict, params: dict[str, np.ndarray], where: str) -> Result[dict[str, np.ndarray], str]:
    """Our `<path>.lora_a` (in, r) / `.lora_b` (r, out) as llama.cpp's `<gguf name>.lora_a` (r, in) /
    `.lora_b` (out, r), float32, Q/K `lora_b` rows permuted like the base's."""
    if dora := sorted(k for k in params if k.endswith(".m")):
        return Failure(f"{where}: {dora[0]} is a DoRA magnitude, which llama.cpp's LoRA adapters cannot hold; "
                       "fuse it instead (ft fuse, then ft export gguf on the fused model)")
    out = {}
    for key in sorted(params):
        if not key.endswith(".lora_a"):
            continue
        path = key.removesuffix(".lora_a")
        target = core_gguf.to_gguf_name(f"{path}.weight", arch)
        if target is None:
            return Failure(f"{where}: {path} has no GGUF tensor in a {arch} model (llama.cpp cannot apply this adapter)")
        a = dtypes.as_float32(params[key]).T
        b = core_gguf.to_gguf_tensor(arch, target, dtypes.as_float32(params[f"{path}.lora_b"]).T, config)
        out[f"{target}.lora_a"], out[f"{target}.lora_b"] = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return Success(out)


def write_adapter(adapter_dir: Path, output: Path, *, model: str | None = None, gguf_type: str = "f32",
                  force: bool = False, revision: str = "main") -> Result[WrittenAdapter, str]:
    """Write the adapter in `adapter_dir` (any format `ft` reads) for its base (or `model`) as `output`."""
    from finetune.files.models import model_config
    from finetune.shell.export import adapters

    if gguf_type not in ADAPTER_TYPES:
        return Failure(f"--gguf-type {gguf_type}: an adapter GGUF is written as {' or '.join(ADAPTER_TYPES)}")
    match gguf_export.check_target(output, force, gguf_type).bind(lambda _: adapters.load_any(adapter_dir)):
        case Success(found):
            pass
        case Failure(message):
            return Failure(_no_adapter(adapter_dir, message))
    base = model or found.model
    if not base:
        return Failure(f"{found.config_path}: names no base model; pass --model")
    match model_config(base, revision):
        case Success((directory, config)):
            config = dict(config)
        case failure:
            return failure
    match gguf_export.architecture(config, str(Path(directory) / "config.json")).bind(
        lambda arch: adapters.fit(found, config).map(lambda params: (arch, params))
    ):
        case Success((arch, params)):
            pass
        case failure:
            return failure
    match adapter_tensors(arch, config, params, str(found.weights_path)):
        case Success(tensors):
            pass
        case failure:
            return failure
    alpha = float(found.scale) * found.rank
    metadata = {"general.type": "adapter", "general.name": adapter_dir.resolve().name,
                "adapter.type": "lora", "adapter.lora.alpha": alpha,
                "general.file_type": 0 if gguf_type == "f32" else 1}
    encoded = {k: (v, _kind(gguf_type)) if gguf_type == "f32" else (v.astype(np.float16), _kind(gguf_type))
               for k, v in tensors.items()}
    size = gguf_export.write_file(output, arch, metadata, encoded)
    return Success(WrittenAdapter(output=str(output), architecture=arch, pairs=len(tensors) // 2,
                                  rank=found.rank, alpha=alpha, size=size))


def _kind(gguf_type: str):
    import gguf

    return gguf.GGMLQuantizationType.F32 if gguf_type == "f32" else gguf.GGMLQuantizationType.F16


def _no_adapter(directory: Path, message: str) -> str:
    """A missing adapter said as such: a model directory given where a run was expected."""
    if (Path(directory) / "config.json").is_file() and "adapter" in message:
        return f"{directory}: a model with no LoRA adapter; gguf-adapter exports a run's adapter (use --format gguf for a model)"
    return message
