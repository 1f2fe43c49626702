"""The torch engine's base model: weights through the shared checked reader (`files/weights`),
the transformers model built on the `meta` device from config.json (no random init), and the
checkpoint held against that model's own expected tensors, so any architecture transformers has
is checked, not only the registry's. transformers' loader places the tensors (its renames, tied
embeddings, fused MoE experts); a tensor missing, left over or misshapen is refused before the
model is finished, so transformers never fills a weight in.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from returns.result import Failure, Result, Success
from torch import nn

from finetune.core import dtypes
from finetune.files import weights

_LIST = 3  # tensor names a message shows


def attention(model_class: type) -> str:
    """The attention implementation from the class's own flags: sdpa where it supports it."""
    return "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"


def read_config(directory: Path) -> Result[Any, str]:
    """transformers' config for `directory` (no remote code) and its causal-LM class."""
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    where = directory / "config.json"
    if int(transformers.__version__.split(".")[0]) < 5:  # its loader's pieces (LoadStateDictConfig, ...) came in 5
        return Failure(f"the torch engine needs transformers 5 or newer (found {transformers.__version__}); "
                       "pip install -U transformers")
    try:
        with _quiet():  # its warning about the model type: our line says it
            config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as err:  # an unknown model_type, or a broken file
        return Failure(f"{where}: transformers {transformers.__version__} cannot read this config ({_first(err)}); "
                       "the torch engine takes the causal LMs transformers implements")
    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return Failure(f"{where}: model_type {config.model_type!r} has no causal language model in transformers "
                       f"{transformers.__version__}; the torch engine trains causal LMs")
    config._attn_implementation = attention(model_class)
    return Success((config, model_class))


def _first(err: Exception) -> str:
    """The first sentence of an exception's message (transformers' run to paragraphs)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text.split(". ")[0][:200]


def to_torch(a: np.ndarray) -> torch.Tensor:
    """A writable torch copy of a checkpoint array (bfloat16 words reinterpreted, not converted)."""
    if a.dtype == dtypes.BF16:
        return torch.from_numpy(np.array(a.view(np.uint16))).view(torch.bfloat16)
    return torch.from_numpy(np.array(a))


def load_checked(directory: Path, dtype: torch.dtype, spec: str) -> Result[nn.Module, str]:
    """The causal LM of `directory` in `dtype`, eval mode, every weight from the checkpoint."""
    match read_config(directory).bind(
        lambda found: weights.read_checkpoint_numpy(directory).map(lambda read: (*found, *read))
    ):
        case Success((config, model_class, arrays, where)):
            pass
        case failure:
            return failure
    try:
        lm = _skeleton(model_class, config, dtype)
    except (ValueError, TypeError, ImportError, RuntimeError) as err:
        return Failure(f"{directory / 'config.json'}: transformers cannot build {config.model_type!r} from it ({_first(err)})")
    if refusal := _float_refusal(lm, arrays, where):
        return Failure(refusal)
    state = {k: to_torch(v) for k, v in arrays.items()}
    del arrays
    return _load(lm, state, where, directory, dtype)


def _skeleton(model_class: type, config: Any, dtype: torch.dtype) -> nn.Module:
    """The model on the meta device, as `from_pretrained` builds it before reading weights."""
    from transformers.utils import ContextManagers

    with warnings.catch_warnings(), ContextManagers(model_class.get_init_context(dtype, False, False, None, config)):
        warnings.simplefilter("ignore")
        return model_class(config)


def _float_refusal(lm: nn.Module, arrays: Mapping[str, np.ndarray], where: Mapping[str, Path]) -> str | None:
    """An integer or bool tensor stored for one of the model's floating-point weights."""
    expected = {k: v.dtype for k, v in lm.state_dict().items()}
    prefix = f"{lm.base_model_prefix}."
    for name, a in arrays.items():
        want = expected.get(name, expected.get(prefix + name))
        if want is not None and want.is_floating_point and not dtypes.is_float(a):
            return (f"{where[name]}: tensor {name} is stored as {dtypes.name(a)}; a float checkpoint's weights "
                    "are floating point (float32, float16 or bfloat16)")
    return None


def _load(lm: nn.Module, state: dict[str, torch.Tensor], where: Mapping[str, Path], directory: Path,
          dtype: torch.dtype) -> Result[nn.Module, str]:
    """transformers' own placing of the tensors (renames, conversions), refused unless exact."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.modeling_utils import LoadStateDictConfig

    cls = type(lm)
    load_config = LoadStateDictConfig(pretrained_model_name_or_path=str(directory), dtype=dtype,
                                      dtype_plan=lm._get_dtype_plan(dtype), weight_mapping=get_model_conversion_mapping(lm))
    with _quiet():  # its loading report: our one line says what matters
        info, _ = cls._load_pretrained_model(lm, state, None, load_config)
        lm._adjust_missing_and_unexpected_keys(info)
        if refusal := _refusal(lm, info, where, directory):
            return Failure(refusal)
        cls._finalize_model_loading(lm, load_config, info)
    if on_meta := next((k for k, t in _tensors(lm) if t.is_meta), None):
        return Failure(f"{weights.source(directory)}: {lm.config.model_type} tensor {on_meta} was not loaded")
    return Success(lm.eval())


@contextmanager
def _quiet() -> Iterator[None]:
    """transformers' warnings and log lines silenced (errors still raise)."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.set_verbosity(level)


def _tensors(lm: nn.Module):
    yield from lm.named_parameters()
    yield from lm.named_buffers()


def _refusal(lm: nn.Module, info: Any, where: Mapping[str, Path], directory: Path) -> str | None:
    """One line for the first thing that keeps the checkpoint from being exactly the model's."""
    kind, model = lm.config.model_type, type(lm).__name__
    tied = set(getattr(lm, "all_tied_weights_keys", {}) or {})
    source = weights.source(directory)
    if info.mismatched_keys:
        name, got, want = sorted(info.mismatched_keys, key=lambda m: m[0])[0]
        return (f"{_file(name, where, source)}: tensor {name} has shape {tuple(got)}, but config.json "
                f"({kind}) implies {tuple(want)}")
    if missing := sorted(set(info.missing_keys) - tied):
        more = f" and {len(missing) - _LIST} more" if len(missing) > _LIST else ""
        return (f"{source}: missing {len(missing)} tensor(s) that {kind} ({model}, built from config.json) needs: "
                f"{', '.join(missing[:_LIST])}{more}")
    if unexpected := sorted(info.unexpected_keys):
        return (f"{_file(unexpected[0], where, source)}: tensor {unexpected[0]} is not part of {kind} ({model}); "
                "the checkpoint does not match config.json")
    if info.conversion_errors:
        name, why = sorted(info.conversion_errors.items())[0]
        return f"{source}: cannot convert tensor {name} for {kind} ({str(why).splitlines()[0][:200]})"
    if info.error_msgs:
        return f"{source}: {str(info.error_msgs[0]).splitlines()[0][:200]}"
    return None


def _file(name: str, where: Mapping[str, Path], source: Path) -> Path:
    """The file holding `name`, or one of its prefixed or bare forms; else the checkpoint."""
    if name in where:
        return where[name]
    return next((f for k, f in where.items() if k.endswith("." + name) or name.endswith("." + k)), source)
