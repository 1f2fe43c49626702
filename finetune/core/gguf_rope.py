"""Llama 3 rope scaling <-> llama.cpp's `rope_freqs.weight` (pure).

llama.cpp keeps a Llama 3 rope only as one divisor per rotary frequency. The scaled frequencies
are `core.arch_rope`'s (the decoder's own), so a divisor is the plain frequency over the scaled one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from returns.result import Failure, Result, Success

from finetune.core import arch_rope


def theta_and_scaling(config: Mapping[str, Any]) -> tuple[float, dict]:
    """`rope_theta` and the rope dict of a config.json, in either config style."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    return theta, params


def _plain(head_dim: int, theta: float) -> np.ndarray:
    return np.array([theta ** (-(i / head_dim)) for i in range(0, head_dim, 2)])  # as arch_rope


def _divisors(head_dim: int, theta: float, factor: float, low: float, high: float, old: int) -> np.ndarray:
    rope = arch_rope.Rope(kind="llama3", theta=theta, dims=head_dim, factor=factor,
                          low_freq_factor=low, high_freq_factor=high, original_max=old)
    scaled = np.asarray(arch_rope.inv_freq(rope, 0))
    return (_plain(head_dim, theta) / scaled).astype(np.float32)


def llama3_rope_factors(config: Mapping[str, Any]) -> np.ndarray | None:
    """llama.cpp's `rope_freqs.weight` (frequency divisors) for a Llama 3 rope, else None."""
    theta, scaling = theta_and_scaling(config)
    if scaling.get("rope_type", scaling.get("type")) != "llama3":
        return None
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return _divisors(head_dim, theta, scaling["factor"], scaling["low_freq_factor"],
                     scaling["high_freq_factor"], int(scaling["original_max_position_embeddings"]))


def llama3_from_factors(factors: np.ndarray, head_dim: int, theta: float, old: int) -> Result[dict, str]:
    """The Llama 3 rope parameters that give these `rope_freqs` divisors (checked by regenerating them).

    Only `old / low_freq_factor` and `old / high_freq_factor` shape the frequencies, so `old` (the
    original context) is taken as given and the two factors are solved from the smoothed band.
    """
    freqs = _plain(head_dim, theta)
    f = np.asarray(factors, np.float64)
    if f.shape != freqs.shape or not np.all(np.isfinite(f)) or f.min() < 1 - 1e-6:
        return Failure("rope factors of the wrong length or below one")
    factor = float(f.max())
    if factor <= 1 + 1e-6:
        return Failure("rope factors are all one")
    x = old / (2 * math.pi / freqs)  # old / wavelen
    medium = (f > 1 + 1e-5) & (f < factor - 1e-5 * factor)
    for edges in _llama3_edges(x, f, factor, medium):
        for low, high in ((round(edges[0], 6), round(edges[1], 6)), edges):  # 1.0, not 0.9999999986
            if high > low and np.allclose(_divisors(head_dim, theta, factor, low, high, int(old)), f,
                                          rtol=1e-4, atol=1e-5):
                return Success({"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                                "high_freq_factor": high, "original_max_position_embeddings": int(old)})
    return Failure("rope factors do not follow Llama 3's rope scaling")


def _llama3_edges(x: np.ndarray, f: np.ndarray, factor: float, medium: np.ndarray) -> list[tuple[float, float]]:
    """Candidate (low_freq_factor, high_freq_factor) for divisors `f` at `x = old / wavelength`."""
    smooth = (1 / f[medium] - 1 / factor) / (1 - 1 / factor)  # = (x - low) / (high - low)
    if medium.sum() >= 2:
        slope, intercept = np.polyfit(x[medium], smooth, 1)
        return [(float(-intercept / slope), float((1 - intercept) / slope))]
    lows, highs = x[f >= factor * (1 - 1e-5)], x[f <= 1 + 1e-5]  # bands scaled fully / not at all
    floor = float(lows.max()) if lows.size else float(x.min()) / 2
    ceiling = float(highs.min()) if highs.size else float(x.max()) * 2
    if medium.sum() == 1:  # one point of the smoothed band: any edges through it will do
        xm, sm = float(x[medium][0]), float(smooth[0])
        if not 0 < sm < 1:
            return []
        steps = np.linspace(0.05, 0.95, 19)
        by_low = [(lo, lo + (xm - lo) / sm) for lo in (floor + t * (xm - floor) for t in steps)]
        by_high = [((xm - sm * hi) / (1 - sm), hi) for hi in (xm + t * (ceiling - xm) for t in steps)]
        return [(lo, hi) for lo, hi in by_low + by_high if floor < lo <= xm <= hi < ceiling]
    return [(floor + (ceiling - floor) / 3, floor + 2 * (ceiling - floor) / 3)]
