"""ParallelDims: the one owner of the run's parallel sizes and rank arithmetic. Torch-free.

It sits in the config room (not parallel/) because config validation, which must name the file
and line of a bad value, needs the data-parallel size, and config is the bottom layer: parallel/
builds process groups and the Topology from these numbers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelDims:
    """world = tensor x data x pipeline. Rank order is megatron-core's parallel_state (tensor fastest,
    then data, then pipeline), which is also DeepSpeed's PipeModelDataParallelTopology(pipe, data,
    model): consecutive ranks share a tensor-parallel group."""

    world: int
    tensor: int
    pipeline: int

    @property
    def model_parallel(self) -> int:
        """Ranks that hold one copy of the model: tensor x pipeline."""
        return self.tensor * self.pipeline

    @property
    def valid(self) -> bool:
        """Whether tensor x pipeline divides the world (else there is no data-parallel size)."""
        return self.world >= 1 and self.world % self.model_parallel == 0

    @property
    def data(self) -> int:
        """Data-parallel size: the model replicas, world / (tensor x pipeline)."""
        if not self.valid:
            raise ValueError(f"world size {self.world} is not divisible by tensor {self.tensor} x pipeline "
                             f"{self.pipeline} = {self.model_parallel}")
        return self.world // self.model_parallel

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """(tensor rank, data rank, pipeline rank) of global `rank`."""
        return rank % self.tensor, (rank // self.tensor) % self.data, rank // (self.tensor * self.data)
