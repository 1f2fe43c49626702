"""A transformers causal LM with peft LoRA (or DoRA) attached from the core's initial values.

Our adapter names are HF module paths (`model.layers.3.self_attn.q_proj.lora_a`), so peft's
modules and our tensors meet without renaming: `lora_A.weight` = `lora_a`ᵀ, `lora_B.weight` = `lora_b`ᵀ.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Mapping

import msgspec
import numpy as np
import torch
from returns.result import Failure, Result, Success
from torch import nn

from finetune.core import adapters as core_adapters
from finetune.core import dtypes, lora
from finetune.core.config import Recipe
from finetune.engines.torch import kernels

_BLOCK_LISTS = ("layers", "h", "blocks", "block", "layer")  # peft's own layer-list names


class Lora(nn.Module):
    """A peft-wrapped causal LM and what training needs from it."""

    def __init__(self, peft_model: nn.Module, prefix: str, paths: tuple[str, ...], compile: bool = False):
        super().__init__()
        self.peft = peft_model
        self.lm = peft_model.get_base_model()
        self.backbone = getattr(self.lm, self.lm.base_model_prefix)
        self.prefix = prefix  # where the blocks live, e.g. `model.layers`
        self.paths = paths  # adapted module paths, sorted
        self.use_compile = compile  # nn.Module.compile is a method: another name
        self.compiled: Callable | None = None  # the compiled (or fallen-back) hidden, built on first use

    def hidden(self, inputs: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, D) final hidden states; restarting `positions` mark packed documents.

        Training calls run torch.compile's graph when `compile` is on (forward and backward);
        evaluation (no grad) stays eager, saving a second compilation for a small share of the time.
        """
        if self.use_compile and torch.is_grad_enabled():
            if self.compiled is None:
                self.compiled = _compiled(self._hidden, inputs.device)
            return self.compiled(inputs, positions)
        return self._hidden(inputs, positions)

    def _hidden(self, inputs: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        # A half-precision base computes its LoRA paths in that precision too (autocast; the
        # factors and optimizer stay float32): 1.5-2x faster on SmolLM's shape than peft's
        # float32 paths, which cast every input up and every output back (benchmarks/README.md).
        half = self.half_precision()
        with torch.autocast(inputs.device.type, dtype=half, enabled=half is not None):
            return self.backbone(input_ids=inputs, position_ids=positions, use_cache=False).last_hidden_state

    def half_precision(self) -> torch.dtype | None:
        """The base's dtype when it is bfloat16 or float16, else None."""
        return self.lm.dtype if self.lm.dtype in (torch.bfloat16, torch.float16) else None

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm.get_output_embeddings()(h)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V), like `finetune.load`'s models."""
        return self.head(self.hidden(inputs))

    def adapters(self) -> dict[str, torch.Tensor]:
        """`{<path>.lora_a: (in, r), <path>.lora_b: (r, out)}` (and DoRA's `<path>.m`: (out,)),
        float32, detached, on the CPU."""
        return {k: (v.T if v.ndim == 2 else v).detach().float().cpu().contiguous() for k, v in self.trainable().items()}

    def trainable(self) -> dict[str, torch.Tensor]:
        """Our tensor names -> the live peft parameters, in peft's (transposed) layout; a DoRA
        layer's magnitude (`lora_magnitude_vector`) is our `.m`."""
        modules = dict(self.lm.named_modules())
        out = {}
        for path in self.paths:
            out[f"{path}.lora_a"] = modules[path].lora_A["default"].weight
            out[f"{path}.lora_b"] = modules[path].lora_B["default"].weight
            if "default" in modules[path].lora_magnitude_vector:
                out[f"{path}.m"] = modules[path].lora_magnitude_vector["default"].weight
        return out

    def our_shape(self, name: str, tensor: torch.Tensor) -> tuple[int, ...]:
        """The shape of trainable `name` in our layout (peft's factors transposed)."""
        return tuple(tensor.shape[::-1])

    def transposed(self) -> set[str] | None:
        """Trainable names stored transposed of our layout (None: every 2-D one, peft's factors)."""
        return None

    def load_adapters(self, params: Mapping[str, np.ndarray]) -> None:
        """Set the factors from our layout ((in, r) / (r, out))."""
        live = self.trainable()
        with torch.no_grad():
            for name, value in params.items():
                live[name].copy_(torch.from_numpy(np.ascontiguousarray(np.asarray(value).T)))


def _compiled(fn: Callable, device: torch.device) -> Callable:
    """`fn` under torch.compile, or `fn` itself with a note where torch.compile cannot run.

    Shapes are dynamic from the start: batches are padded to multiples of 32 tokens, so one
    graph serves every length instead of one compilation per length.
    """
    from finetune.engines.torch import device as devices

    reason = devices.compile_blocker(device)
    if reason:
        print(f"Note: {reason}; training without torch.compile (--no-compile hides this note)", file=sys.stderr)
        return fn
    compiled = torch.compile(fn, dynamic=True)

    def call(*args):
        nonlocal compiled
        try:
            return compiled(*args)
        except torch._dynamo.exc.BackendCompilerFailed as err:  # e.g. a compiler that cannot build the kernels
            print(f"Note: torch.compile failed ({str(err).splitlines()[0][:200]}); training without it", file=sys.stderr)
            compiled = fn
            return fn(*args)

    return call


def checkpoint_dropout_off(lm: nn.Module) -> None:
    """The checkpoint's own dropout (GPT-2's 0.1) off for training: the MLX engine and mlx-lm have
    none, so both engines train the same function (LoRA's own `--dropout` is peft's, added later)."""
    for m in lm.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def block_list(lm: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The transformer blocks: where the registry puts them (an image-text Gemma 3's text model, not its
    vision tower's), else the first ModuleList of blocks (`model.layers`, `transformer.h`, ...)."""
    from finetune.core import architectures

    known = architectures.REGISTRY.get(getattr(getattr(lm, "config", None), "model_type", None))
    if known is not None and isinstance(found := dict(lm.named_modules()).get(known.blocks), nn.ModuleList):
        return known.blocks, found
    for name, module in lm.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in _BLOCK_LISTS and len(module):
            return name, module
    return None


def is_conv1d(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def linear_shapes(block: nn.Module) -> dict[str, tuple[int, int]]:
    """`{key path in the block: (in, out)}` for its Linear and GPT-2 Conv1D layers, sorted."""
    out = {}
    for name, m in block.named_modules():
        if isinstance(m, nn.Linear):
            out[name] = (m.in_features, m.out_features)
        elif is_conv1d(m):
            out[name] = tuple(m.weight.shape)  # Conv1D stores (in, out)
    return dict(sorted(out.items()))


def attach(lm: nn.Module, recipe: Recipe, spec: str) -> Result[Lora, str]:
    """peft LoRA on the recipe's keys and layers, starting from the core's initial values."""
    from peft import LoraConfig, get_peft_model

    from finetune.core import peft as core_peft

    found = block_list(lm)
    if found is None:
        return Failure(f"{spec}: no list of transformer blocks found in this model; LoRA targets blocks")
    prefix, blocks = found
    block = linear_shapes(blocks[0])
    keys = lora.resolve_keys(recipe.lora.keys, tuple(block))
    unknown = [k for k in keys if k not in block]
    if unknown:
        return Failure(f"$.lora.keys: {', '.join(unknown)} not in this model's blocks; choose from all-linear, {', '.join(block)}")
    if recipe.lora.num_layers > len(blocks):
        return Failure(f"$.lora.num_layers: {recipe.lora.num_layers} exceeds the model's {len(blocks)} layers")
    checkpoint_dropout_off(lm)
    layers = lora.select_layers(len(blocks), recipe.lora.num_layers)
    paths = lora.targets(prefix, layers, keys)
    shapes = {f"{prefix}.{i}.{k}": block[k] for i in layers for k in keys}
    config = LoraConfig(
        r=recipe.lora.rank, lora_alpha=core_peft.alpha_for(recipe.lora.scale, recipe.lora.rank),
        lora_dropout=recipe.lora.dropout, target_modules=core_peft.scoped_targets(paths, every=False),  # exactly these
        fan_in_fan_out=any(is_conv1d(blocks[0].get_submodule(k)) for k in keys), bias="none",
        use_dora=recipe.lora.fine_tune_type == "dora",  # `m` starts at ‖W‖ per row: B starts at zero
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes about fan_in_fan_out and Conv1D
        model = Lora(get_peft_model(lm, config), prefix, tuple(sorted(paths)), compile=recipe.train.compile)
    missing = set(paths) - {n for n, m in model.lm.named_modules() if hasattr(m, "lora_A")}
    assert not missing, f"peft did not adapt {sorted(missing)}"
    model.load_adapters(lora.init(recipe.train.seed, shapes, recipe.lora.rank))
    if model.half_precision():  # `hidden` autocasts; peft's own cast to float32 would only add copies
        for path in model.paths:
            model.lm.get_submodule(path).cast_input_dtype_enabled = False
    kernels.install(model.lm)  # LoRA's add inside its matmul; a bf16 model's CPU attention in float32
    return Success(model)


def describe_trainable(model: Lora) -> tuple[int, int]:
    """(LoRA parameters, all parameters)."""
    trainable = sum(p.numel() for p in model.trainable().values())
    total = sum(p.numel() for p in model.lm.parameters())
    return trainable, total


def with_adapter(lm: nn.Module, directory: str) -> Result[nn.Module, str]:
    """peft LoRA holding the adapter's tensors (any format `ft` reads), on its layers when they are
    the last N (what `num_layers` says), else on every layer with the ones it lacks at B = 0."""
    from finetune.engines.torch.load import USE_MLX
    from finetune.files.adapters import load_any

    match load_any(directory, full=True):
        case Success(found):
            pass
        case Failure(message):
            return Failure(message)
    if found.spec is not None and found.spec.fine_tune_type == "full":  # trained weights over the base's
        from finetune.engines.torch.full import load_trained

        return load_trained(lm, found)
    if found.spec is not None and found.spec.base_quantization:
        return Failure(f"{found.config_path}: trained on a quantized base (base_quantization); {USE_MLX}")
    blocks = block_list(lm)
    if blocks is None:
        return Failure(f"{directory}: no list of transformer blocks found in this model to attach LoRA to")
    prefix, layers_list = blocks
    params = {k: np.array(dtypes.as_float32(v)) for k, v in found.params.items()}  # float32 (bf16 words too), writable
    layers, keys = core_adapters.layers_and_keys(core_adapters.paths_of(params))
    linears = linear_shapes(layers_list[0])
    unknown = [k for k in keys if k not in linears]
    if not layers or unknown:
        what = ", ".join(unknown) or "no LoRA layers"
        return Failure(f"{found.weights_path}: {what} not in this model's blocks (has: {', '.join(linears)})")
    shapes = core_adapters.block_shapes(linears, prefix, len(layers_list))
    checked = core_adapters.check_shapes(params, shapes, found.rank, str(found.weights_path), found.names)
    if isinstance(checked, Failure):
        return checked
    total = len(layers_list)
    tail = layers == tuple(range(total - len(layers), total))
    r = Recipe()
    recipe = msgspec.structs.replace(r, lora=msgspec.structs.replace(
        r.lora, rank=found.rank, scale=found.scale, dropout=0.0, keys=keys, num_layers=len(layers) if tail else -1,
        fine_tune_type="dora" if any(k.endswith(".m") for k in params) else "lora"))
    return attach(lm, recipe, directory).map(lambda m: _loaded(m, params))


def _loaded(model: Lora, params: dict[str, np.ndarray]) -> nn.Module:
    model.load_adapters(params)
    return model.lm
