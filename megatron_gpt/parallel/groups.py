"""Process-group start-up and Topology: the run's ParallelDims plus this rank and its device.

Rank order (tensor fastest, then data, then pipeline) is megatron-core parallel_state's, which
is also DeepSpeed's PipeModelDataParallelTopology(axes pipe, data, model) order.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_gpt.config.dims import ParallelDims
from megatron_gpt.parallel.cpu import host_memory, shared_memory
from megatron_gpt.parallel.cpu.threads import threads_per_rank


@dataclass(frozen=True)
class Topology:
    """Sizes of each parallel dimension and this rank's coordinates in them."""

    world_size: int
    rank: int
    local_rank: int
    tensor: int
    pipeline: int
    data: int
    tensor_rank: int
    pipeline_rank: int
    data_rank: int
    device: torch.device
    shared_memory: bool = False
    """Whether DeepSpeed's shared-memory kernel serves all-reduces over the world (CPU, one host)."""

    @property
    def is_first(self) -> bool:
        """Global rank 0: the rank that prints and writes run-level files."""
        return self.rank == 0

    @property
    def data_parallel_group(self):
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_group()


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_distributed(tensor: int, pipeline: int, device_choice: str = "auto", threads: int | None = None,
                     shared_memory_allreduce: bool = True) -> Topology:
    """Join the process group the launcher set up (env://) and build megatron-core's groups.
    On CPU, ranks on one host get DeepSpeed's shared-memory all-reduce (see shared_memory)."""
    import deepspeed
    from megatron.core import parallel_state

    device = pick_device(device_choice)
    if device.type == "cpu":
        torch.set_num_threads(threads_per_rank(os.environ, threads))
        host_memory.keep_freed_memory()
    else:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        prepared = False
        if device.type == "cpu":
            from deepspeed.constants import default_pg_timeout

            dist.init_process_group("gloo", timeout=default_pg_timeout)  # as DeepSpeed would
            prepared = shared_memory.prepare(shared_memory_allreduce)
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                   auto_mpi_discovery=False, verbose=False)
        shared_memory.release(prepared)
    if parallel_state.model_parallel_is_initialized() and (
            parallel_state.get_tensor_model_parallel_world_size() != tensor
            or parallel_state.get_pipeline_model_parallel_world_size() != pipeline):
        parallel_state.destroy_model_parallel()  # a new layout in the same process group
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor,
                                                 pipeline_model_parallel_size=pipeline)
    world = dist.get_world_size()
    return Topology(
        world_size=world, rank=dist.get_rank(), local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        tensor=tensor, pipeline=pipeline, data=ParallelDims(world, tensor, pipeline).data,
        tensor_rank=parallel_state.get_tensor_model_parallel_rank(),
        pipeline_rank=parallel_state.get_pipeline_model_parallel_rank(),
        data_rank=parallel_state.get_data_parallel_rank(),
        device=device, shared_memory=device.type == "cpu" and shared_memory.running(),
    )


def seed_everything(seed: int) -> None:
    """Same seed on every rank: weights are built identically and sliced per tensor rank."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
