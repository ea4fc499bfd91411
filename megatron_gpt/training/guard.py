"""Divergence guard: a step whose loss or gradient norm is not finite (or, with
training.spike_factor, whose loss jumps above factor x the median of recent steps) is not applied.

The check runs inside the optimizer's step, which the plain and the pipeline engine both reach
once per optimizer step on every rank, after the gradients are final and before any parameter
changes. Every rank votes (parallel.vote: one scalar on the host) so they all skip together: a data rank with
a NaN batch cannot leave the others' replicas apart. A skipped step leaves the parameters, the
optimizer state and the LR schedule as they were (DeepSpeed's own fp16-overflow path: the
optimizer's `overflow` flag), and its gradients are dropped. training.max_skipped_steps skips in a
row stop the run with :class:`Diverged` (exit code DIVERGED_EXIT_CODE); since nothing non-finite
is ever applied, no checkpoint can hold it.
"""

from __future__ import annotations

import math
import os
from collections import deque

import torch
import torch.distributed as dist

from megatron_gpt.parallel.groups import Topology
from megatron_gpt.parallel.vote import any_rank

FAULT_STEPS = "MEGATRON_GPT_FAULT_NAN_STEPS"
"""Test hook: comma-separated steps (0-based) at which the first rank that holds the loss sees
NaN, as a diverging run would; the other ranks see their real loss (the vote must carry it)."""


class Diverged(RuntimeError):
    """training.max_skipped_steps non-finite steps in a row; `step` is the last one skipped."""

    def __init__(self, step: int, skipped: int, why: str):
        super().__init__(f"training diverged: {skipped} steps in a row were skipped ({why}), the last at step "
                         f"{step + 1}; nothing was applied or saved from them. fix: lower optimizer.lr, raise "
                         "schedule.warmup_steps or training.gradient_clipping, check the data, or resume from "
                         "an earlier checkpoint")
        self.step, self.skipped = step, skipped


class StepGuard:
    """Wraps the engine's optimizer step. `loss` is set by the runner before the step (the plain
    runner's step loss; the pipeline's last stage reads the engine's total_loss)."""

    def __init__(self, engine, topo: Topology, params: list, max_skipped: int, spike_factor: float | None = None,
                 grad_norm=None, window: int = 20):
        self.engine, self.topo, self.params = engine, topo, params
        self.max_skipped, self.spike_factor = max_skipped, spike_factor
        self.grad_norm = grad_norm  # callable: the norm the trainer computed this step, or None
        self.recent: deque[float] = deque(maxlen=window)
        self.loss: torch.Tensor | None = None
        self.last_loss: float | None = None
        self.step_index = 0
        self.skipped_total = self.in_a_row = 0
        self.skipped_now = False
        self.why = ""
        self.faults = {int(s) for s in os.environ.get(FAULT_STEPS, "").split(",") if s.strip()}
        optimizer = engine.optimizer
        self.owns_overflow = hasattr(optimizer, "overflow")  # ZeRO and fp16 optimizers check it themselves
        self.real_step = optimizer.step
        optimizer.step = self._step

    def _local_loss(self) -> float | None:
        loss = self.loss
        if loss is None:  # pipeline: only the last stage holds the loss, before its aggregation
            loss = getattr(self.engine, "total_loss", None)
            if loss is not None:
                loss = loss / max(self.engine.gradient_accumulation_steps(), 1)
        if loss is None:
            return None
        value = float(loss.detach().float().sum().item())
        if self.step_index in self.faults and _first_holder(self.topo):
            value = math.nan
        self.last_loss = value
        return value

    def _bad_here(self) -> str:
        loss = self._local_loss()
        if loss is not None and not math.isfinite(loss):
            return "non-finite loss"
        norm = self.grad_norm() if self.grad_norm is not None else None
        if norm is None:
            grads = [p.grad for p in self.params if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else None
        if norm is not None and not math.isfinite(float(norm)):
            return "non-finite gradient norm"
        if loss is not None and self.spike_factor and len(self.recent) >= 5:
            median = sorted(self.recent)[len(self.recent) // 2]
            if loss > self.spike_factor * median:
                return f"loss spike {loss:.4f} > {self.spike_factor} x median {median:.4f}"
        return ""

    def _step(self, *args, **kwargs):
        why = self._bad_here()
        optimizer = self.engine.optimizer
        self.skipped_now = any_rank(bool(why), self.topo.shared_memory)
        if self.skipped_now:
            self.why = why or "a non-finite loss or gradient norm on another rank"
            optimizer.overflow = True  # DeepSpeed then leaves the LR schedule alone and counts a skip
            if hasattr(optimizer, "averaged_gradients"):  # ZeRO 1/2 keeps the reduced gradients here
                optimizer.averaged_gradients = {}
            optimizer.zero_grad(set_to_none=True)
            return None
        if not self.owns_overflow:
            optimizer.overflow = False
        result = self.real_step(*args, **kwargs)
        # ZeRO's and fp16's own overflow check may still have skipped (non-finite gradients)
        self.skipped_now = bool(getattr(optimizer, "overflow", False))
        if self.skipped_now:
            self.why = "optimizer overflow (non-finite gradients)"
        else:
            if self.last_loss is not None:
                self.recent.append(self.last_loss)
        return result

    def after_step(self, step: int) -> None:
        """Called by the trainer once a step is done: counts skips, raises Diverged at the limit."""
        if self.skipped_now:
            self.skipped_total += 1
            self.in_a_row += 1
        else:
            self.in_a_row = 0
        skipped, self.skipped_now, self.loss, self.last_loss = self.skipped_now, False, None, None
        self.step_index = step + 1
        if skipped and self.in_a_row >= self.max_skipped:
            raise Diverged(step, self.in_a_row, self.why)


def _first_holder(topo: Topology) -> bool:
    """The rank the fault hook poisons: global rank 0, or the first rank of the last stage."""
    if not dist.is_initialized():
        return True
    if topo.pipeline == 1:
        return dist.get_rank() == 0
    return dist.get_rank() == dist.get_world_size() - topo.tensor * topo.data
