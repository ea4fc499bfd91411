"""Quantities derived from a Config: the batch layout over ranks, the ZeRO stage DeepSpeed runs,
and the padded vocabulary."""

from __future__ import annotations

from dataclasses import dataclass

from .dims import ParallelDims
from .loader import ConfigError, layout_problems
from .passthrough import offload_device
from .schema import Config


@dataclass(frozen=True)
class BatchLayout:
    """How one optimizer step's sequences are spread over ranks and micro-batches."""

    world_size: int
    tensor: int
    pipeline: int
    data_parallel: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    global_batch_size: int  # = micro_batch_size * gradient_accumulation_steps * data_parallel


def batch_layout(cfg: Config, world_size: int | None = None) -> BatchLayout:
    """Resolve data-parallel size and gradient accumulation; ``world_size`` overrides the launcher's."""
    problems = layout_problems(cfg, world_size)
    if problems:
        raise ConfigError.of(problems)
    world = cfg.world_size if world_size is None else world_size
    tp, pp, t = cfg.parallelism.tensor, cfg.parallelism.pipeline, cfg.training
    dp = ParallelDims(world, tp, pp).data
    if t.global_batch_size is not None:
        ga = t.global_batch_size // (t.micro_batch_size * dp)
    else:
        ga = t.gradient_accumulation_steps or 1
    return BatchLayout(world_size=world, tensor=tp, pipeline=pp, data_parallel=dp,
                       micro_batch_size=t.micro_batch_size, gradient_accumulation_steps=ga,
                       global_batch_size=t.micro_batch_size * ga * dp)


def engine_zero_stage(cfg: Config, data_parallel: int) -> int:
    """The ZeRO stage DeepSpeed runs. Stages 1 and 2 shard optimizer states (and gradients) over
    data-parallel ranks; over one rank they shard nothing, yet DeepSpeed's ZeRO path still copies
    every gradient into its buckets and the weights back each step (about 10% of a small model's
    CPU step), so there the engine runs without ZeRO: same AdamW, same clipping, same numbers.
    Pipeline stages keep ZeRO-1, whose optimizer reports the gradient norm, and so does an
    offloaded optimizer (deepspeed.zero_optimization.offload_optimizer): ZeRO's optimizer runs it."""
    stage = cfg.parallelism.zero_stage
    offloaded = offload_device(cfg.deepspeed, "offload_optimizer") != "none"
    single = data_parallel == 1 and cfg.parallelism.pipeline == 1 and not offloaded
    return 0 if stage in (1, 2) and single else stage


def trainer_clips_gradients(cfg: Config, data_parallel: int) -> bool:
    """Whether the trainer clips gradients itself instead of DeepSpeed: fp32 without ZeRO and
    without pipeline stages, where DeepSpeed clips but keeps no gradient norm to report."""
    return (engine_zero_stage(cfg, data_parallel) == 0 and cfg.training.precision == "fp32"
            and cfg.parallelism.pipeline == 1 and cfg.training.gradient_clipping > 0)


def padded_vocab_size(vocab_size: int, cfg: Config) -> int:
    """Round up so every tensor-parallel shard of the embedding gets an equal, aligned slice."""
    multiple = cfg.model.make_vocab_size_divisible_by * cfg.parallelism.tensor
    return -(-vocab_size // multiple) * multiple
