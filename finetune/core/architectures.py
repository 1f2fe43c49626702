"""Everything FineTune knows about each HuggingFace `model_type`, declared once (pure).

Per model_type: how its config.json reads (sizes, flags, HF's defaults), its checkpoint's tensors
(symbolic shapes, biases and the flags that make them exist, buffers to drop, the tied embedding),
the linear layers of a block (LoRA targets) and which are GPT-2 `Conv1D`s stored transposed, where
the blocks live in HF's module tree and in mlx-lm's adapter files, and the MLX module file that
implements it. Conversion, model facts, memory estimates, LoRA targeting, fuse and PEFT conversion
read this table. The tensor tables are derived from the row's module names (`arch_rows.Layout`);
adding an architecture means a row here (and `arch_rows.Row` traits) plus a parity test, and the
one MLX decoder (`finetune.engines.mlx.decoder`) runs it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from returns.result import Failure, Result, Success

from finetune.core import arch_rows
from finetune.core.arch_rows import GEMMA2_LAYOUT, Layout, Row

# (tensor name, shape as symbols of the dims table, flag of the dims table it needs, or "")
Entry = tuple[str, tuple[str, ...], str]


class Dims(NamedTuple):
    """A config's sizes and flags, HF's defaults applied (what every consumer reads)."""

    layers: int
    vocab: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    context: int
    tied: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False

    def symbols(self) -> dict[str, int]:
        """The symbols the shape tables use: L V D F Q K HD QKV F2 P, and the bias/tie flags."""
        q, k = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "L": self.layers, "V": self.vocab, "D": self.hidden, "F": self.intermediate,
            "Q": q, "K": k, "HD": self.head_dim, "QKV": q + 2 * k, "F2": 2 * self.intermediate,
            "P": self.context, "untied": not self.tied,
            "qkv_bias": self.qkv_bias, "o_bias": self.o_bias, "mlp_bias": self.mlp_bias,
        }


class Architecture(NamedTuple):
    """One family of model types that share a module file and a checkpoint layout."""

    family: str  # the naming family adapters are written in: "llama", "gpt2" or "gemma3"
    module: str  # the MLX module file: `finetune.engines.mlx.<module>` (Model, args_from_config)
    read: Callable[[str, Mapping[str, Any]], Dims]  # config.json -> Dims (KeyError: missing field)
    top: tuple[Entry, ...]  # tensors outside the blocks
    layer: tuple[Entry, ...]  # tensors of one block, relative to `blocks.{i}.`
    linears: tuple[tuple[str, str, str], ...]  # (key path in a block, in symbol, out symbol)
    conv1d: frozenset[str]  # block linears stored (in, out) in HF checkpoints
    blocks: str  # where blocks live in HF's *ForCausalLM (= our module paths)
    adapter_blocks: str  # where mlx-lm's adapter files put them
    embed: str  # the input embedding, which a tied head shares
    prefix: str  # HF base-model prefix that bare checkpoints lack
    buffers: tuple[str, ...]  # key suffixes of non-parameter buffers to drop
    row: Row = Row()  # how the family computes (the decoder's reading of config.json)
    # Image-text checkpoints: (stored prefix, ours) of the text model's older spellings, and the
    # prefixes of the parts the text model does not hold (vision tower, projector), kept by `ft fuse`.
    renames: tuple[tuple[str, str], ...] = ()
    others: tuple[str, ...] = ()



def reader(row: Row) -> Callable[[str, Mapping[str, Any]], Dims]:
    """config.json -> Dims for a family using HF's usual field names and `row`'s defaults."""

    def read(model_type: str, c: Mapping[str, Any]) -> Dims:
        heads, hidden = c["num_attention_heads"], c["hidden_size"]
        qkv, o, mlp = (arch_rows.flag(c, b, row.bias_default) for b in row.bias)
        return Dims(
            layers=c["num_hidden_layers"], vocab=c["vocab_size"], hidden=hidden,
            intermediate=c["intermediate_size"], heads=heads,
            kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or row.head_dim or hidden // heads,
            context=c.get("max_position_embeddings", 2048),
            tied=bool(c.get("tie_word_embeddings", row.tied)), qkv_bias=qkv, o_bias=o, mlp_bias=mlp,
        )

    return read


def _read_gpt2(model_type: str, c: Mapping[str, Any]) -> Dims:
    d, heads = c["n_embd"], c["n_head"]
    return Dims(
        layers=c["n_layer"], vocab=c["vocab_size"], hidden=d, intermediate=c.get("n_inner") or 4 * d,
        heads=heads, kv_heads=heads, head_dim=d // heads, context=c.get("n_positions", 1024),  # GPT2Config's default
        tied=bool(c.get("tie_word_embeddings", True)), qkv_bias=True, o_bias=True, mlp_bias=True,
    )


def _norm(path: str, row: Row, size: str = "D") -> list[Entry]:
    out = [(f"{path}.weight", (size,), "")]
    return out + [(f"{path}.bias", (size,), "")] if row.norm == "layer" else out


def _linear(path: str, fan_in: str, fan_out: str, bias: str) -> list[Entry]:
    return [(f"{path}.weight", (fan_out, fan_in), ""), (f"{path}.bias", (fan_out,), bias)]


def linears_of(n: Layout) -> tuple[tuple[str, str, str], ...]:
    """A block's linear layers `(path, in symbol, out symbol)` as the layout names them."""
    a, m = n.attn, n.mlp
    attn = [(f"{a}.{n.qkv}", "D", "QKV")] if n.qkv else [
        (f"{a}.{n.q}", "D", "Q"), (f"{a}.{n.k}", "D", "K"), (f"{a}.{n.v}", "D", "K")]
    if n.gate_up:
        mlp = [(f"{m}.{n.gate_up}", "D", "F2")]
    else:
        mlp = ([(f"{m}.{n.gate}", "D", "F")] if n.gate else []) + [(f"{m}.{n.up}", "D", "F")]
    return (*attn, (f"{a}.{n.o}", "Q", "D"), *mlp, (f"{m}.{n.down}", "F", "D"))


def _tables(row: Row) -> tuple[tuple[Entry, ...], tuple[Entry, ...]]:
    """(top, layer) tensor tables of a row, derived from its layout."""
    n = row.layout
    top = [(f"{n.backbone}.{n.embed}.weight", ("V", "D"), "")]
    top += [(f"{n.backbone}.{n.positions}.weight", ("P", "D"), "")] if n.positions else []
    top += _norm(f"{n.backbone}.{n.final_norm}", row) + [(f"{n.head}.weight", ("V", "D"), "untied")]
    layer: list[Entry] = []
    for norm in (n.attn_in, n.attn_out, n.mlp_in, n.mlp_out):
        layer += _norm(norm, row) if norm else []
    for path, fan_in, fan_out in linears_of(n):
        kind = "o_bias" if path.endswith(f".{n.o}") else "mlp_bias" if path.startswith(f"{n.mlp}.") else "qkv_bias"
        layer += _linear(path, fan_in, fan_out, kind)
    if row.qk_norm:
        head = row.qk_norm == "head"
        layer += _norm(f"{n.attn}.q_norm", row, "HD" if head else "Q")
        layer += _norm(f"{n.attn}.k_norm", row, "HD" if head else "K")
    return tuple(top), tuple(layer)


def architecture(row: Row, family: str = "llama", read: Callable[[str, Mapping[str, Any]], Dims] | None = None,
                 conv1d: frozenset[str] = frozenset(), adapter_blocks: str = "",
                 buffers: tuple[str, ...] = (".rotary_emb.inv_freq",), renames: tuple[tuple[str, str], ...] = (),
                 others: tuple[str, ...] = ()) -> Architecture:
    """An `Architecture` whose tables come from `row.layout`."""
    n = row.layout
    top, layer = _tables(row)
    blocks = f"{n.backbone}.{n.layers}"
    return Architecture(
        family=family, module="decoder", read=read or reader(row), top=top, layer=layer,
        linears=linears_of(n), conv1d=conv1d, blocks=blocks, adapter_blocks=adapter_blocks or blocks,
        embed=f"{n.backbone}.{n.embed}.weight", prefix=f"{n.backbone}.", buffers=buffers, row=row,
        renames=renames, others=others,
    )


_QWEN_WINDOWS = arch_rows.by_types(arch_rows.qwen_types, gate="use_sliding_window")
_GEMMA = dict(offset=1.0, act=("hidden_act", "gelu_pytorch_tanh"), tied=True, head_dim=256, embed_scale="sqrt")
_GEMMA2 = _GEMMA | dict(layout=GEMMA2_LAYOUT, act=("hidden_activation", "gelu_pytorch_tanh"),
                        query_scale="query_pre_attn_scalar")
_LAYER_NORM = dict(norm="layer")

LLAMA = architecture(Row())
MISTRAL = architecture(Row(bias=("no", "no", "no"), windows=arch_rows.every_layer(4096)))
QWEN2 = architecture(Row(bias=("yes", "no", "no"), windows=_QWEN_WINDOWS))
QWEN3 = architecture(Row(bias=("attention_bias", "attention_bias", "no"), qk_norm="head",
                         windows=_QWEN_WINDOWS))
GEMMA = architecture(Row(**_GEMMA, bias=("attention_bias", "attention_bias", "no"),
                         fixups=(arch_rows.gemma_tanh_gelu,)))
GEMMA2 = architecture(Row(**_GEMMA2, bias=("attention_bias", "attention_bias", "no"),
                          attn_softcap=("attn_logit_softcapping", 50.0),
                          final_softcap=("final_logit_softcapping", 30.0),
                          windows=arch_rows.by_types(arch_rows.pattern_types(2))))
_GEMMA3_TYPES = arch_rows.pattern_types(6)
_GEMMA3_TEXT_ROW = Row(**_GEMMA2, bias=("attention_bias", "attention_bias", "no"), qk_norm="head",
                       attn_softcap=("attn_logit_softcapping", 0.0), final_softcap=("final_logit_softcapping", 0.0),
                       windows=arch_rows.by_types(_GEMMA3_TYPES), fixups=(arch_rows.gemma3_hub_rope,),
                       rope_types=lambda c, n: tuple(c.get("layer_types") or _GEMMA3_TYPES(c, n)))
GEMMA3_TEXT = architecture(_GEMMA3_TEXT_ROW)
# Gemma 3 image-text: its text model under HF's module path `model.language_model` (what peft and the
# torch engine see); checkpoints store it as `language_model.model.`, mlx-lm's adapters as its blocks.
_GEMMA3_ROW = _GEMMA3_TEXT_ROW._replace(layout=GEMMA2_LAYOUT._replace(backbone="model.language_model"),
                                        fixups=(arch_rows.gemma3_text_part, arch_rows.gemma3_hub_rope))
GEMMA3 = architecture(
    _GEMMA3_ROW, family="gemma3", read=lambda kind, c: reader(_GEMMA3_ROW)(kind, arch_rows.gemma3_text_part(c)),
    adapter_blocks="language_model.model.layers",
    renames=(("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head.")),
    others=("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector."),
)
PHI3 = architecture(Row(layout=Layout(qkv="qkv_proj", gate="", up="", gate_up="gate_up_proj"),
                        eps=("rms_norm_eps", 1e-5), bias=("no", "no", "no"), windows=arch_rows.every_layer(),
                        fixups=(arch_rows.phi3_longrope,)))
OLMO2 = architecture(Row(layout=Layout(attn_in="", attn_out="post_attention_layernorm", mlp_in="",
                                       mlp_out="post_feedforward_layernorm"),
                         eps=("rms_norm_eps", 1e-5), qk_norm="full", bias=("attention_bias", "attention_bias", "no")))
SMOLLM3 = architecture(Row(tied=True, theta=2_000_000.0, rope_layers=arch_rows.no_rope,
                           windows=arch_rows.by_types(arch_rows.smollm3_types, gate="use_sliding_window")))
GRANITE = architecture(Row(embed_scale="embedding_multiplier", query_scale="attention_multiplier",
                           residual_scale="residual_multiplier", logits_scale="logits_scaling"))
STARCODER2 = architecture(Row(layout=Layout(gate="", up="c_fc", down="c_proj"), **_LAYER_NORM,
                              eps=("norm_epsilon", 1e-5), act=("hidden_act", "gelu_pytorch_tanh"),
                              bias=("use_bias", "use_bias", "use_bias"), bias_default=True, tied=True,
                              windows=arch_rows.every_layer()))
GPT_NEOX = architecture(
    Row(layout=Layout(backbone="gpt_neox", embed="embed_in", final_norm="final_layer_norm", head="embed_out",
                      attn="attention",
                      qkv="query_key_value", qkv_order="heads", o="dense", gate="", up="dense_h_to_4h",
                      down="dense_4h_to_h"),
        **_LAYER_NORM, eps=("layer_norm_eps", 1e-5), act=("hidden_act", "gelu"),
        bias=("attention_bias", "attention_bias", "yes"), bias_default=True,
        parallel=("use_parallel_residual", True), partial=0.25),
    buffers=(".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq"),
)
GPT2 = architecture(
    Row(layout=Layout(backbone="transformer", embed="wte", positions="wpe", layers="h", final_norm="ln_f",
                      attn="attn", qkv="c_attn", o="c_proj", gate="", up="c_fc", down="c_proj",
                      attn_in="ln_1", mlp_in="ln_2"),
        **_LAYER_NORM, eps=("layer_norm_epsilon", 1e-5), act=("activation_function", "gelu_new"),
        bias=("yes", "yes", "yes"), tied=True, query_scale="scale_attn_weights", learned_positions=True),
    family="gpt2", read=_read_gpt2,
    # HF stores these as Conv1D (in, out); nn.Linear wants (out, in).
    conv1d=frozenset({"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}),
    adapter_blocks="model.h",  # mlx-lm's GPT-2 calls the same module `model.`
    buffers=(".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq"),
)

REGISTRY: dict[str, Architecture] = {
    "llama": LLAMA, "mistral": MISTRAL, "qwen2": QWEN2, "qwen3": QWEN3, "gemma": GEMMA, "gemma2": GEMMA2,
    "gemma3_text": GEMMA3_TEXT, "gemma3": GEMMA3, "phi3": PHI3, "olmo2": OLMO2, "smollm3": SMOLLM3, "granite": GRANITE,
    "starcoder2": STARCODER2, "gpt_neox": GPT_NEOX, "gpt2": GPT2,
}
SUPPORTED = tuple(REGISTRY)
# The naming families of adapter files: where blocks live in mlx-lm's files (GPT-2 and Gemma 3 differ).
FAMILIES: dict[str, Architecture] = {"llama": LLAMA, "gpt2": GPT2, "gemma3": GEMMA3}


def unsupported(model_type: Any) -> str:
    return f"unsupported architecture {model_type!r}; supported: {', '.join(SUPPORTED)}"


def dims(config: Mapping[str, Any]) -> Result[Dims, str]:
    """A config.json's sizes and flags; a Failure names a missing or bad field."""
    kind = config.get("model_type")
    if kind not in REGISTRY:
        return Failure(unsupported(kind))
    try:
        return Success(REGISTRY[kind].read(kind, config))
    except KeyError as err:
        return Failure(f"config.json lacks field {err.args[0]!r} for model_type {kind!r}")
    except (TypeError, ValueError, ZeroDivisionError) as err:
        return Failure(f"config.json: bad field for model_type {kind!r} ({err})")


def decoder(config: Mapping[str, Any]) -> arch_rows.Decoder:
    """config.json resolved against its row; KeyError/ValueError for a bad or unsupported config."""
    kind = config.get("model_type")
    if kind not in REGISTRY:
        raise ValueError(unsupported(kind))
    arch = REGISTRY[kind]
    return arch_rows.spec(kind, arch.row, arch.read(kind, config), config)


def linear_shapes(arch: Architecture, d: Dims) -> dict[str, tuple[int, int]]:
    """`{key path within a block: (in_features, out_features)}` of every linear layer."""
    s = d.symbols()
    return {path: (s[i], s[o]) for path, i, o in arch.linears}


def family_of_blocks(prefix: str) -> Architecture:
    """The family whose blocks live at `prefix` (`transformer.h` -> gpt2, `model.language_model.layers`
    -> gemma3, else llama)."""
    return next((a for a in FAMILIES.values() if prefix.startswith(a.blocks)), LLAMA)
