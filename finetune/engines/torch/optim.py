"""MLX's Adam/AdamW and gradient clipping in torch ops, for the torch engine.

No bias correction, decoupled decay `p·(1 − lr·λ)`: torch's own Adam always corrects bias, so it
would train differently. The state uses MLX's names (`<tensor>.m`, `.v`, `step`,
`learning_rate`) in our layout.
"""

from __future__ import annotations

import numpy as np
import torch

from finetune.core import schedule
from finetune.core.config import TrainingConfig

BETAS, EPS = (0.9, 0.999), 1e-8


class Optimizer:
    """MLX's Adam / AdamW over named float32 parameters (peft's layout; elementwise, so any)."""

    def __init__(self, params: dict[str, torch.Tensor], cfg: TrainingConfig, total_steps: int,
                 transposed: set[str] | None = None):
        """`transposed`: the names stored transposed of our layout (None: every 2-D one, peft's factors)."""
        self.params = params
        self.transposed = transposed
        self.decay = cfg.weight_decay if cfg.optimizer == "adamw" else 0.0
        self.schedule = schedule.build(cfg, total_steps)
        self.step = 0
        self.m = {k: torch.zeros_like(p) for k, p in params.items()}
        self.v = {k: torch.zeros_like(p) for k, p in params.items()}

    def learning_rate(self, step: int) -> float:
        """The rate of update `step + 1` (the schedule is float32, as in the MLX engine)."""
        return float(self.schedule(np.uint64(step)))

    @torch.no_grad()
    def update(self, grads: dict[str, torch.Tensor]) -> None:
        """One step over every tensor at once (`torch._foreach_*`: one call per operation, not per
        tensor); the same operations in the same order as a per-tensor loop, so the same floats."""
        lr = self.learning_rate(self.step)
        b1, b2 = BETAS
        ps, ms, vs = list(self.params.values()), list(self.m.values()), list(self.v.values())
        gs = [grads[k] for k in self.params]
        if self.decay:
            torch._foreach_mul_(ps, 1 - lr * self.decay)
        torch._foreach_mul_(ms, b1)
        torch._foreach_add_(ms, gs, alpha=1 - b1)
        torch._foreach_mul_(vs, b2)
        torch._foreach_addcmul_(vs, gs, gs, value=1 - b2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_add_(denom, EPS)
        torch._foreach_addcdiv_(ps, ms, denom, value=-lr)  # p + (−lr·m) / d: the loop's p − (lr·m) / d
        self.step += 1

    def state(self) -> dict[str, np.ndarray]:
        """MLX's flattened names, our (transposed) layout."""
        out = {"step": np.array(self.step, np.uint64), "learning_rate": np.array(self.learning_rate(max(self.step - 1, 0)), np.float32)}
        for k in self.params:
            out[f"{k}.m"] = _numpy(self._flip(k, self.m[k].detach().cpu()))
            out[f"{k}.v"] = _numpy(self._flip(k, self.v[k].detach().cpu()))
        return out

    def restore(self, state: dict[str, np.ndarray]) -> None:
        self.step = int(np.asarray(state["step"]).reshape(-1)[0])
        for k, p in self.params.items():
            for moments in (self.m, self.v):
                saved = torch.from_numpy(np.ascontiguousarray(state[f"{k}.{'m' if moments is self.m else 'v'}"]))
                moments[k] = self._flip(k, saved).contiguous().to(p.device, moments[k].dtype)

    def _flip(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """A moment in our layout (and back: a transpose)."""
        return _flip(x) if self.transposed is None else (x.T if name in self.transposed else x)


def _numpy(x: torch.Tensor) -> np.ndarray:
    """A copy as NumPy (bfloat16 as float32: NumPy has none; exact)."""
    return (x.float() if x.dtype == torch.bfloat16 else x).contiguous().numpy().copy()


def _flip(x: torch.Tensor) -> torch.Tensor:
    """A factor's moment in our (transposed) layout; a DoRA magnitude's (1-D) as it is."""
    return x.T if x.ndim == 2 else x


def clip_(grads: dict[str, torch.Tensor], max_norm: float) -> None:
    """MLX's clip_grad_norm: scale by min(1, max_norm / (‖g‖ + 1e-6)), in place, every tensor at once."""
    gs = list(grads.values())
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(gs, dtype=torch.float32)))
    torch._foreach_mul_(gs, torch.clamp(max_norm / (norm + 1e-6), max=1.0))
