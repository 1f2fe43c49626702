"""PEFT <-> ours conversion on random adapters: both round trips are bitwise on the tensors and
exact on the config (scales with a short decimal form exact, any other scale within 3 ulps)."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from finetune.core import lora
from finetune.core import peft as core_peft
from finetune.core.adapters import BLOCK_LINEARS, AdapterSpec
from finetune.shell.export import adapters

PROPS = settings(max_examples=60, deadline=None)
PREFIX = {"llama": "model.layers", "gpt2": "transformer.h"}
DTYPES = {"float32": (mx.float32, mx.uint32), "float16": (mx.float16, mx.uint16), "bfloat16": (mx.bfloat16, mx.uint16)}
# Spec, restated independently: PEFT's names and (r, in) / (out, r) layouts.
PEFT_A = "base_model.model.{}.lora_A.weight"
PEFT_B = "base_model.model.{}.lora_B.weight"


def bits(x: mx.array) -> np.ndarray:
    return np.array(x.view(DTYPES[str(x.dtype).removeprefix("mlx.core.")][1]))


def same_bits(a: mx.array, b: mx.array) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(bits(a), bits(b))


decimal_scales = st.integers(1, 100_000).map(lambda i: i / 100)
any_scales = st.floats(1e-3, 1e3, allow_nan=False, allow_infinity=False)


@st.composite
def ours(draw, scales=decimal_scales):
    """(spec, {our tensor name: array}, total layers) for a random kind, layers, keys, rank, dtype."""
    kind = draw(st.sampled_from(["llama", "gpt2"]))
    total = draw(st.integers(1, 4))
    num_layers = draw(st.sampled_from([-1, *range(1, total + 1)]))
    keys = tuple(sorted(draw(st.lists(st.sampled_from(BLOCK_LINEARS[kind]), min_size=1, unique=True))))
    rank = draw(st.integers(1, 6))
    dtype = DTYPES[draw(st.sampled_from(list(DTYPES)))][0]
    dims = {k: (draw(st.integers(1, 9)), draw(st.integers(1, 9))) for k in keys}
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    params = {}
    for path in lora.targets(PREFIX[kind], lora.select_layers(total, num_layers), keys):
        fan_in, fan_out = dims[path.split(".", 3)[-1]]
        params[f"{path}.lora_a"] = mx.array(rng.standard_normal((fan_in, rank)).astype(np.float32)).astype(dtype)
        params[f"{path}.lora_b"] = mx.array(rng.standard_normal((rank, fan_out)).astype(np.float32)).astype(dtype)
    spec = AdapterSpec(rank=rank, scale=draw(scales), keys=keys, num_layers=num_layers, model="org/base")
    return spec, params, total


def to_peft_and_back(spec, params, total):
    paths = sorted({n.rpartition(".")[0] for n in params})
    tensors = core_peft.to_peft(params)
    raw = json.loads(json.dumps(core_peft.config_json(spec, paths, spec.model)))  # through JSON text
    pspec = core_peft.parse_config(raw, "c").unwrap()
    back = core_peft.from_peft(tensors, "t").unwrap()
    layers = sorted({int(p.split(".")[2]) for p in paths})
    n = core_peft.num_layers(layers, pspec, total, "c").unwrap()
    return tensors, raw, back, core_peft.to_spec(pspec, paths, n)


@PROPS
@given(ours())
def test_ours_to_peft_to_ours_is_exact(case):
    spec, params, total = case
    tensors, raw, back, spec2 = to_peft_and_back(spec, params, total)
    for name, value in params.items():  # PEFT layout, restated
        path, _, leaf = name.rpartition(".")
        stored = tensors[(PEFT_A if leaf == "lora_a" else PEFT_B).format(path)]
        assert same_bits(stored, value.T)
    assert len(tensors) == len(params)
    assert back.keys() == params.keys() and all(same_bits(back[k], params[k]) for k in params)
    assert spec2 == spec
    assert raw["peft_type"] == "LORA" and raw["r"] == spec.rank
    assert raw["fan_in_fan_out"] is any(p.startswith("transformer.") for p in params)


@PROPS
@given(ours(scales=any_scales))
def test_any_scale_survives_within_three_ulps(case):
    spec, params, total = case
    *_, spec2 = to_peft_and_back(spec, params, total)
    assert abs(spec2.scale - spec.scale) <= 3 * math.ulp(spec.scale)
    assert spec2.rank == spec.rank and spec2.keys == spec.keys and spec2.num_layers == spec.num_layers


@st.composite
def peft_adapters(draw):
    """(raw adapter_config.json, PEFT tensors, total layers) as peft would write them."""
    kind = draw(st.sampled_from(["llama", "gpt2"]))
    total = draw(st.integers(1, 4))
    keys = sorted(draw(st.lists(st.sampled_from(BLOCK_LINEARS[kind]), min_size=1, unique=True)))
    skip = draw(st.integers(0, total - 1))
    layers = draw(st.sampled_from([None, list(range(skip, total))]))
    rank = draw(st.integers(1, 8))
    alpha = draw(st.one_of(st.integers(1, 256), st.floats(0.01, 512, allow_nan=False)))
    rslora = draw(st.booleans())
    raw = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "use_rslora": rslora,
        "target_modules": sorted({k.rsplit(".", 1)[-1] for k in keys}), "layers_to_transform": layers,
        "lora_dropout": draw(st.sampled_from([0.0, 0.05])), "fan_in_fan_out": kind == "gpt2", "bias": "none",
        "base_model_name_or_path": "org/base",
    }
    dtype = DTYPES[draw(st.sampled_from(list(DTYPES)))][0]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    tensors = {}
    for i in range(total) if layers is None else layers:
        for key in keys:
            fan_in, fan_out = draw(st.integers(1, 7)), draw(st.integers(1, 7))
            path = f"{PREFIX[kind]}.{i}.{key}"
            tensors[PEFT_A.format(path)] = mx.array(rng.standard_normal((rank, fan_in)).astype(np.float32)).astype(dtype)
            tensors[PEFT_B.format(path)] = mx.array(rng.standard_normal((fan_out, rank)).astype(np.float32)).astype(dtype)
    return raw, tensors, total


@PROPS
@given(peft_adapters())
def test_peft_to_ours_to_peft_is_exact(case):
    raw, tensors, total = case
    pspec = core_peft.parse_config(raw, "c").unwrap()
    params = core_peft.from_peft(tensors, "t").unwrap()
    paths = sorted({n.rpartition(".")[0] for n in params})
    layers = sorted({int(p.split(".")[2]) for p in paths})
    spec = core_peft.to_spec(pspec, paths, core_peft.num_layers(layers, pspec, total, "c").unwrap())
    kept = json.loads(json.dumps(core_peft.kept_fields(raw)))  # as an import stores them
    scale = raw["lora_alpha"] / (math.sqrt(raw["r"]) if raw["use_rslora"] else raw["r"])
    assert abs(spec.scale - scale) <= 2 * math.ulp(scale)

    back = core_peft.to_peft(params)
    assert back.keys() == tensors.keys() and all(same_bits(back[k], tensors[k]) for k in tensors)
    again = json.loads(json.dumps(core_peft.config_json(spec, paths, spec.model, kept)))
    for field in ("r", "lora_alpha", "use_rslora", "target_modules", "layers_to_transform", "lora_dropout",
                  "fan_in_fan_out", "bias", "base_model_name_or_path", "peft_type", "task_type"):
        assert again[field] == raw[field], field
    # without the remembered fields (plain LoRA, alpha = scale · r) the scale is kept to 3 ulps
    plain = core_peft.config_json(spec, paths, spec.model)
    assert plain["use_rslora"] is False
    assert abs(core_peft.scale_of(plain["lora_alpha"], plain["r"]) - spec.scale) <= 3 * math.ulp(spec.scale)


@settings(max_examples=15, deadline=None)
@given(ours())
def test_directories_round_trip_bitwise(case):
    spec, params, total = case
    kind = "gpt2" if next(iter(params)).startswith("transformer.") else "llama"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        adapters.save(root / "a", params, spec, kind)
        first = adapters.load_any(root / "a").unwrap()
        adapters.write_adapter(root / "b", *adapters.peft_files(first), "peft")
        middle = adapters.load_any(root / "b").unwrap()
        assert middle.format == "peft"
        adapters.write_adapter(root / "c", *adapters.mlx_files(middle, total).unwrap(), "mlx-lm")
        a, c = (mx.load(str(root / d / "adapters.safetensors")) for d in ("a", "c"))
        assert a.keys() == c.keys() and all(same_bits(a[k], c[k]) for k in a)
        config_a, config_c = (json.loads((root / d / "adapter_config.json").read_text()) for d in ("a", "c"))
        assert {k: v for k, v in config_c.items() if k != "peft"} == config_a
