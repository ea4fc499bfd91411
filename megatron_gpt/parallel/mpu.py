"""The `mpu` object DeepSpeed asks for, over megatron-core's parallel_state groups."""

from __future__ import annotations

import torch.distributed as dist


class DeepSpeedMPU:
    """The `mpu` DeepSpeed asks for (pipeline=1): ZeRO partitions over megatron-core's
    data-parallel group, and gradient norms are summed over its tensor-parallel group
    (DeepSpeed counts a replicated parameter only on tensor rank 0)."""

    def __init__(self):
        from megatron.core import parallel_state

        self._ps = parallel_state

    def get_model_parallel_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return self._ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_src_rank()

    def get_data_parallel_rank(self) -> int:
        return self._ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self._ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self._ps.get_data_parallel_group()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.get_data_parallel_group())
