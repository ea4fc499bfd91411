"""The gradient path, chosen once per run: who averages the data-parallel gradients (DeepSpeed's
engine, or the trainer through the CPU shared-memory kernel), who clips them (DeepSpeed, or the
trainer where DeepSpeed keeps no norm to report), and where the ranks' preemption votes travel
(inside that gradient all-reduce, or in a collective of their own)."""

from __future__ import annotations

import torch
from torch import nn

from megatron_gpt.config import engine_zero_stage, trainer_clips_gradients
from megatron_gpt.config.schema import Config
from megatron_gpt.parallel.cpu import shared_memory
from megatron_gpt.parallel.groups import Topology
from megatron_gpt.parallel.mpu import DeepSpeedMPU
from megatron_gpt.training.preemption import Watcher


class GradientSync:
    """Averages gradients over the data-parallel ranks as DeepSpeed's stage-0 path does (sum,
    then times 1/ranks: the same numbers), through the shared-memory kernel in one flat buffer
    kept between steps. Call it once per optimizer step, after the last backward: afterwards
    every parameter's .grad is a view of `grads` (no copy back; clip_gradients then works on
    `grads` in one pass), until the engine sets the gradients to None after stepping.

    The same all-reduce carries one more number, each rank's preemption vote (1 if it got a
    signal): `stop_votes` is their sum, so the step-boundary check needs no collective of its own
    (every collective is a point where the faster rank waits for the slower)."""

    def __init__(self, parameters: list[nn.Parameter], ranks: int):
        self.params = parameters
        self.sizes = [p.numel() for p in parameters]
        self.flat = torch.empty(sum(self.sizes) + 1, dtype=torch.float32)
        self.grads = self.flat[:-1]
        self.views = [view.view_as(p) for view, p in zip(self.grads.split(self.sizes), parameters)]
        self.scale = 1.0 / ranks
        self.stop_votes = 0.0

    def __call__(self, stop_vote: bool = False) -> None:
        # an unused parameter's gradient counts as zeros, as in DeepSpeed's reduction
        torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.params],
                  out=self.grads)
        self.flat[-1] = float(stop_vote)
        shared_memory.all_reduce(self.flat)
        self.stop_votes = self.flat[-1].item()
        self.grads.mul_(self.scale)
        for param, view in zip(self.params, self.views):
            param.grad = view


def clip_gradients(parameters: list[nn.Parameter], max_norm: float, topo: Topology,
                   flat: torch.Tensor | None = None) -> torch.Tensor:
    """Clip the gradients of `parameters` (the whole model's) to `max_norm` by their global L2 norm
    and return that norm (before clipping), as DeepSpeed's fp32 path does without keeping the norm.
    `flat`: one buffer every gradient is a view of (GradientSync.grads), scaled as a whole, as torch
    does (coefficient max_norm / (norm + 1e-6), at most 1). Otherwise, at tensor-parallel size 1
    torch's foreach kernels; else DeepSpeed's, which counts tensor-parallel duplicates (norms,
    biases of row-parallel layers) once and sums over the model-parallel group."""
    if flat is not None:
        norm = torch.linalg.vector_norm(flat)
        flat.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        return norm
    params = [p for p in parameters if p.grad is not None]
    if topo.tensor == 1:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    from deepspeed.runtime.utils import clip_grad_norm_

    return clip_grad_norm_(params, max_norm, mpu=DeepSpeedMPU())


class GradientPath:
    """Decided once from the config, the topology and the engine (see the module docstring).
    `at_boundary` runs after the last backward of a step and before the engine steps."""

    def __init__(self, cfg: Config, topo: Topology, engine, params: list[nn.Parameter], watcher: Watcher):
        self.topo, self.engine, self.params, self.watcher = topo, engine, params, watcher
        zero = engine_zero_stage(cfg, topo.data)
        self.max_norm = cfg.training.gradient_clipping
        self.clips = trainer_clips_gradients(cfg, topo.data)
        """The trainer clips (fp32 without ZeRO or pipeline stages): DeepSpeed would keep no norm."""
        # Plain data parallelism (ZeRO-0, fp32, tensor = pipeline = 1) of CPU ranks that share
        # DeepSpeed's shared-memory kernel, whose group is the whole world: the trainer reduces.
        reduces_itself = (topo.shared_memory and 1 < topo.data == topo.world_size and zero == 0
                          and cfg.training.precision == "fp32")
        self.sync = GradientSync(params, topo.data) if reduces_itself else None
        if reduces_itself or (topo.data == 1 and zero == 0):
            # one data-parallel rank: DeepSpeed would still flatten, all-reduce over itself and copy
            # back every gradient after each backward (a PipelineEngine has it off already)
            engine.enable_backward_allreduce = False
        self.last_norm: torch.Tensor | None = None

    @property
    def reducer(self) -> str:
        """Who averages data-parallel gradients: "shared memory" (the trainer) or "engine"."""
        return "shared memory" if self.sync is not None else "engine"

    def at_boundary(self) -> None:
        if self.sync is not None:
            self.sync(stop_vote=self.watcher.received is not None)
        if self.clips:
            self.last_norm = clip_gradients(self.params, self.max_norm, self.topo,
                                            flat=self.sync.grads if self.sync is not None else None)

    def stop_requested(self) -> bool:
        """Whether any rank got a preemption signal (the same answer on every rank): from the
        step's gradient all-reduce where it carried the votes, else a collective of its own."""
        if self.sync is not None:
            return self.sync.stop_votes > 0
        return self.watcher.requested(self.topo.shared_memory)

    def grad_norm(self):
        """The last step's global gradient norm (before clipping), or None where nothing keeps it."""
        return self.last_norm if self.clips else self.engine.get_global_grad_norm()
