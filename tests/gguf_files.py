"""Small GGUF files in llama.cpp's real layout, written with `gguf.GGUFWriter` from tiny HF models.

Independent of `finetune.core.gguf`: tensor names come from gguf-py's own `TensorNameMap` (what
llama.cpp's converter uses), the Q/K rows are permuted as llama.cpp's `LlamaModel.permute` does,
Gemma norm gains get llama.cpp's `+ 1`, a Llama 3 rope becomes a `rope_freqs.weight` tensor
computed from transformers' own rope functions, and the tokenizer is stored as `tokenizer.ggml.*`
metadata with the chat template. K-quant files get random blocks (gguf-py cannot quantize them),
whose dequantized values are then the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from hf_models import _CLASSES, tiny_config
from transformers import AutoTokenizer, PreTrainedModel

GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
             "gemma3_text": "gemma3", "phi3": "phi3", "olmo2": "olmo2"}
K_QUANTS = ("Q2_K", "Q4_K", "Q5_K", "Q6_K")
# (byte offset, scale) of the float16 fields in one 256-value block: d (and dmin) small enough
# that the weights stay of order 0.1.
_K_FIELDS = {"Q2_K": ((80, 1e-3), (82, 1e-3)), "Q4_K": ((0, 2e-4), (2, 1e-3)), "Q5_K": ((0, 1e-4), (2, 1e-3)), "Q6_K": ((208, 4e-5),)}


def build_model(variant: str, vocab: int, seed: int = 0, **overrides) -> PreTrainedModel:
    """A tiny float32 HF model of `variant` (tests/hf_models.py) with `vocab` tokens, order-one weights."""
    config = tiny_config(variant)
    config.vocab_size = vocab
    for k, v in overrides.items():
        setattr(config, k, v)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 0, 1, 2
    torch.manual_seed(seed)
    model = _CLASSES[config.model_type](config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".weight") and "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    return model


OTHER_DIMS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256)


def build_other(model_type: str, vocab: int, seed: int = 0) -> PreTrainedModel:
    """A tiny qwen3, gemma2, gemma3_text, phi3 or olmo2 (windows shorter than the test prompts)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {"gemma2": dict(query_pre_attn_scalar=16, sliding_window=8),
             "gemma3_text": dict(query_pre_attn_scalar=16, sliding_window=8),
             "phi3": dict(head_dim=None, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                          "partial_rotary_factor": 0.5})}.get(model_type, {})
    dims = {k: v for k, v in (OTHER_DIMS | extra).items() if v is not None}
    config = AutoConfig.for_model(model_type, vocab_size=vocab, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                                  **dims)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".weight") and "norm" in name:
                p.copy_((0.0 if model_type.startswith("gemma") else 1.0) + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    return model


def _theta(config) -> float:
    params = config.rope_parameters or {}
    return float(params.get("full_attention", params).get("rope_theta", 10000.0))


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute` (rotate-half -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_freqs(config) -> np.ndarray | None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = config.rope_parameters or {}
    if params.get("rope_type") != "llama3":
        return None
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    plain = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return (plain / scaled).numpy().astype(np.float32)


def _quantize(data: np.ndarray, qtype: str, rng: np.random.Generator) -> tuple[np.ndarray, Q]:
    kind = Q[qtype]
    block, size = gguf.GGML_QUANT_SIZES[kind]
    if data.ndim != 2 or data.shape[1] % block:
        return data.astype(np.float32), Q.F32  # llama.cpp's fallback for rows a block cannot cover
    if qtype in K_QUANTS:
        raw = rng.integers(0, 256, (data.shape[0], data.shape[1] // block, size), dtype=np.uint8)
        for offset, scale in _K_FIELDS[qtype]:
            d = (scale * rng.uniform(0.5, 1.5, raw.shape[:2])).astype(np.float16)
            raw[:, :, offset:offset + 2] = d.view(np.uint8).reshape(*raw.shape[:2], 2)
        return raw.reshape(data.shape[0], -1), kind
    return gguf.quants.quantize(data.astype(np.float32), kind), kind


def _tokenizer_metadata(writer: gguf.GGUFWriter, tokenizer_dir: Path) -> None:
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["content"] for a in spec["added_tokens"] if a["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    writer.add_token_list(tokens)
    if (spec.get("pre_tokenizer") or {}).get("type") == "Metaspace":  # SentencePiece: scores, no merges
        writer.add_tokenizer_model("llama")
        writer.add_token_scores([-float(i) for i in range(len(tokens))])
        writer.add_token_types([gguf.TokenType.UNKNOWN if t == tok.unk_token else gguf.TokenType.CONTROL
                                if t in special else gguf.TokenType.NORMAL for t in tokens])
        writer.add_unk_token_id(tok.unk_token_id)
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
        writer.add_token_merges(merges)
    writer.add_bos_token_id(tok.bos_token_id)
    writer.add_eos_token_id(tok.eos_token_id)
    if tok.pad_token_id is not None:
        writer.add_pad_token_id(tok.pad_token_id)
    writer.add_add_bos_token(tok("a")["input_ids"][0] == tok.bos_token_id)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


def write_gguf(model: PreTrainedModel, tokenizer_dir: Path, path: Path, qtype: str = "F32",
               name: str = "tiny", seed: int = 0, arch: str | None = None, drop: tuple[str, ...] = (),
               overrides: dict[str, int] | None = None) -> Path:
    """`model` as llama.cpp's converter would write it, its 2-D tensors stored as `qtype`.

    For broken files: `arch` replaces `general.architecture`, `drop` leaves tensors out and
    `overrides` replaces numbers of the `{arch}.*` metadata (`{"feed_forward_length": 96}`).
    """
    config = model.config
    real_arch = GGUF_ARCH[config.model_type]
    arch = arch or real_arch
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    numbers = {
        "context_length": config.max_position_embeddings, "embedding_length": config.hidden_size,
        "block_count": config.num_hidden_layers, "feed_forward_length": config.intermediate_size,
        "head_count": heads, "head_count_kv": kv,
    } | (overrides or {})
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_context_length(numbers["context_length"])
    writer.add_embedding_length(numbers["embedding_length"])
    writer.add_block_count(numbers["block_count"])
    writer.add_feed_forward_length(numbers["feed_forward_length"])
    writer.add_head_count(numbers["head_count"])
    writer.add_head_count_kv(numbers["head_count_kv"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_theta(config))
    writer.add_rope_dimension_count(int(head_dim * (config.rope_parameters or {}).get("partial_rotary_factor", 1.0)))
    if real_arch.startswith("gemma"):
        writer.add_sliding_window(config.sliding_window)
    if real_arch == "gemma2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if (config.rope_parameters or {}).get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.rope_parameters["factor"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    _tokenizer_metadata(writer, tokenizer_dir)

    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == real_arch),
                                     config.num_hidden_layers)
    rng = np.random.default_rng(seed)
    factors = _rope_freqs(config)
    if factors is not None:
        writer.add_tensor("rope_freqs.weight", factors)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        gname = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert gname is not None, hf_name
        if gname in drop:
            continue
        data = tensor.detach().numpy().astype(np.float32)
        if real_arch == "llama" and ".attn_q." in gname:
            data = llama_permute(data, heads)
        elif real_arch == "llama" and ".attn_k." in gname:
            data = llama_permute(data, kv)
        elif real_arch.startswith("gemma") and gname.endswith("norm.weight"):
            data = data + 1.0
        stored, kind = _quantize(data, qtype, rng)
        writer.add_tensor(gname, stored, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
