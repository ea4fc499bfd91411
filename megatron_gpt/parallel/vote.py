"""One yes/no question asked of every rank at every step (a preemption signal, a diverged step),
answered on the host. Asked every step, so it never makes the host wait for the GPU: an NCCL
all-reduce plus .item() would block until every queued kernel has run. The answer travels through
DeepSpeed's shared-memory kernel where every rank is on one CPU host (Topology.shared_memory), else
over the default group when that is gloo, else over a gloo group of the same ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist

_gloo: dict[int, object] = {}  # a gloo twin of the default group, per default group (new_group is collective)


def any_rank(flag: bool, shared_memory: bool = False) -> bool:
    """True on every rank if `flag` is True on any rank (a collective: every rank calls it alike)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    if shared_memory:
        from megatron_gpt.parallel.cpu.shared_memory import all_reduce

        vote = torch.tensor([float(flag)])
        all_reduce(vote)
        return vote.item() > 0
    vote = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=_host_group())
    return bool(vote.item())


def _host_group():
    if dist.get_backend() == "gloo":
        return None
    key = id(dist.group.WORLD)
    if key not in _gloo:
        _gloo[key] = dist.new_group(backend="gloo")
    return _gloo[key]
