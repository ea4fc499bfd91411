"""The DeepSpeed config dict derived from a Config (no scheduler: the trainer passes its own)."""

from __future__ import annotations

from typing import Any

from .derive import batch_layout
from .schema import Config

_BUCKET = 500_000_000  # elements; Megatron/NeoX's defaults, big enough to keep comm calls few


def deepspeed_config(cfg: Config, world_size: int | None = None) -> dict[str, Any]:
    """JSON-ready dict for ``deepspeed.initialize(config=...)``."""
    layout = batch_layout(cfg, world_size)
    t, o, precision = cfg.training, cfg.optimizer, cfg.training.precision
    return {
        "train_batch_size": layout.global_batch_size,
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.gradient_accumulation_steps,
        "gradient_clipping": t.gradient_clipping,
        "zero_optimization": {
            "stage": cfg.parallelism.zero_stage,
            "reduce_bucket_size": _BUCKET,
            "allgather_bucket_size": _BUCKET,
            "contiguous_gradients": True,
        },
        "bf16": {"enabled": precision == "bf16"},
        # loss_scale 0 = dynamic loss scaling, starting at 2**16.
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o.lr,
                "betas": [o.beta1, o.beta2],
                "eps": o.eps,
                "weight_decay": o.weight_decay,
                # torch.optim.AdamW: avoids DeepSpeed's ~65 s FusedAdam JIT build (and works on CPU).
                "torch_adam": True,
            },
        },
        "steps_per_print": 2**31 - 1,  # the trainer prints its own metrics
        "wall_clock_breakdown": False,
    }
