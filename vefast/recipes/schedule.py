"""Learning-rate schedules shared by the recipes: linear warm-up, then constant or cosine decay.

For optimizer step ``s`` (0-based), warm-up ``W``, decay horizon ``T`` (``optim.decay_steps``, default
``train.steps``) and floor ``r`` (``optim.min_lr_ratio``) every parameter group runs at
``base_lr * f(s)`` with

    f(s) = (s + 1) / W                                          s < W (linear warm-up)
    f(s) = 1                                                    constant
    f(s) = r + (1 - r) (1 + cos(pi p)) / 2,  p = (s - W) / (T - W) clamped to [0, 1]     cosine

The factor is a Python float computed on the host from the step number: setting it costs no device
work and no host sync, and a resumed run recomputes it from the step (nothing to checkpoint).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional

import torch

from .config import require


@dataclasses.dataclass
class LRScheduleConfig:
    """The schedule fields of an ``optim`` section (inherited by the recipes' optimizer configs)."""
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    decay_steps: Optional[int] = None

    def check_schedule(self) -> None:
        require(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        require(0.0 <= self.min_lr_ratio <= 1.0, f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.decay_steps is not None:
            require(self.decay_steps > self.warmup_steps,
                    f"optim.decay_steps ({self.decay_steps}) must exceed optim.warmup_steps ({self.warmup_steps})")

    def depends_on_run_length(self) -> bool:
        """Whether ``train.steps`` shapes the schedule (cosine without an explicit ``decay_steps``)."""
        return self.schedule == "cosine" and self.decay_steps is None


def lr_factor(step: int, sc: LRScheduleConfig, total_steps: int) -> float:
    """f(step) of the module docstring."""
    if sc.warmup_steps and step < sc.warmup_steps:
        return (step + 1) / sc.warmup_steps
    if sc.schedule == "constant":
        return 1.0
    horizon = sc.decay_steps if sc.decay_steps is not None else total_steps
    p = min(1.0, max(0.0, (step - sc.warmup_steps) / max(1, horizon - sc.warmup_steps)))
    return sc.min_lr_ratio + (1.0 - sc.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


def base_lrs(opts: list[torch.optim.Optimizer]) -> list[list[float]]:
    """The configured learning rate of every parameter group (read before a checkpoint's lrs load)."""
    return [[g["lr"] for g in o.param_groups] for o in opts]


def apply_lr(opts: list[torch.optim.Optimizer], lrs: list[list[float]], factor: float) -> None:
    """Set every group's lr to ``base * factor`` (Python floats: no device work)."""
    for o, group_lrs in zip(opts, lrs):
        for g, lr in zip(o.param_groups, group_lrs):
            g["lr"] = lr * factor
