"""Learning-rate schedule: linear warmup from 0, then cosine/linear decay to min_lr."""

from __future__ import annotations

import math
from typing import Callable

from megatron_gpt.config.schema import Config


def lr_multiplier(cfg: Config) -> Callable[[int], float]:
    """Factor of optimizer.lr for the step about to run (0-based), as torch's LambdaLR wants."""
    peak, floor = cfg.optimizer.lr, cfg.optimizer.min_lr
    warmup = cfg.schedule.warmup_steps
    decay_end = cfg.schedule.decay_steps or cfg.training.train_steps
    style = cfg.schedule.decay_style

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup  # the first step already learns (Megatron counts from 1)
        if style == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, decay_end - warmup))
        if style == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            shape = 1.0 - progress
        return (floor + (peak - floor) * shape) / peak

    return factor
