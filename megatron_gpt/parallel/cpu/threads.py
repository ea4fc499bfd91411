"""Intra-op threads per rank on CPU: the one rule launchers and ranks share."""

from __future__ import annotations

import os
from typing import Mapping


def cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def local_world_size(environ: Mapping[str, str]) -> int:
    """Ranks on this node, as torchrun, DeepSpeed's launcher, srun or mpirun report it."""
    for var in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"):
        if environ.get(var, "").isdigit():
            return max(1, int(environ[var]))
    return 1


def threads_per_rank(environ: Mapping[str, str], configured: int | None = None) -> int:
    """`configured` (launcher.threads_per_rank), else OMP_NUM_THREADS where a launcher set it, else
    this node's cores shared out over its ranks: torch's own default, every core for every rank,
    oversubscribes a node."""
    if configured:
        return configured
    preset = environ.get("OMP_NUM_THREADS", "")
    if preset.isdigit() and int(preset) > 0:
        return int(preset)
    return max(1, cores() // local_world_size(environ))
