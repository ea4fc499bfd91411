"""GPTDataset index maps (document, sample and shuffle indices) cached safely across processes.

megatron-core builds the maps on global rank 0 and has every other rank load them after a
barrier; a rank that finds no cache (another node, another filesystem) fails with
FileNotFoundError, and two builders writing the same files with plain np.save can leave a
half-written file for a reader. Here:

- `filesystem_leader` (collective) elects the lowest rank of each group of ranks that see the
  same cache directory: every rank drops a probe file named by a run token, a barrier, then each
  lists the probes it can see. Leaders build, a barrier, then everyone loads.
- Building is also safe without that protocol (separate jobs, stale NFS listings): an fcntl lock
  per map serializes builders, every file is written under a temp name and renamed, and the
  description file goes last, so a complete set is the only thing a reader can see.

Each map covers exactly one epoch of one split of one prefix (GPTDataset with num_samples=None),
so it never depends on the run's length: datasets.py composes epochs and blends on top.
"""

from __future__ import annotations

import fcntl
import os
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch.distributed as dist

from megatron_gpt.data.errors import DataError
from megatron_gpt.data.indexed import remove, temp_name

with warnings.catch_warnings():  # megatron-core warns about missing GPU extras on import
    warnings.simplefilter("ignore")
    from megatron.core.datasets import gpt_dataset as gpt
    from megatron.core.datasets import helpers
    from megatron.core.datasets.utils import Split

ARRAYS = ("document_index", "sample_index", "shuffle_index")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """A barrier over all ranks when torch.distributed is up; nothing otherwise."""
    if _distributed():
        dist.barrier()


def filesystem_leader(directory: str) -> bool:
    """Collective: True on the lowest rank among those that see the same `directory`.

    Stale directory listings (NFS attribute caches) can only make extra leaders, which the
    per-map lock and atomic renames make harmless.
    """
    if not _distributed():
        return True
    rank = dist.get_rank()
    token = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    probe = os.path.join(directory, f".probe-{token[0]}-{rank}")
    with open(probe, "w"):
        pass
    dist.barrier()
    prefix = f".probe-{token[0]}-"
    seen = [int(name[len(prefix):]) for name in os.listdir(directory) if name.startswith(prefix)]
    dist.barrier()  # everyone has listed before any probe goes away
    remove(probe)
    return min(seen) == rank


@contextmanager
def file_lock(path: str) -> Iterator[None]:
    """Exclusive lock held while the block runs (released by the kernel if the process dies)."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:  # a filesystem without locks: atomic renames alone still keep files whole
            pass
        yield


class EpochDataset(gpt.GPTDataset):
    """One epoch of one split of one prefix; its maps built once and shared through the cache."""

    def _build_document_sample_shuffle_indices(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cache = self.config.path_to_cache
        try:
            os.makedirs(cache, exist_ok=True)
        except OSError as e:
            raise DataError(f"{cache}: cannot create the index-map cache ({e.strerror}); "
                            "fix: set data.cache_dir to a writable directory") from None
        base = os.path.join(cache,
                            f"{self.unique_description_hash}-{type(self).__name__}-{self.index_split.name}")
        paths = {name: f"{base}-{name}.npy" for name in ARRAYS}
        description = f"{base}-description.txt"

        def complete() -> bool:
            return os.path.isfile(description) and all(map(os.path.isfile, paths.values()))

        self.built_index_maps = False  # whether this process built them (tests, logs)
        if not complete():
            with file_lock(base + ".lock"):
                if not complete():  # another process may have built it while we waited
                    self._save(self._one_epoch(), paths, description)
                    self.built_index_maps = True
        # Plain ndarray views of the memory maps: indexing an np.memmap goes through its Python
        # subclass hooks, ~2 us a lookup and about ten lookups per sample.
        document_index, sample_index, shuffle_index = (np.asarray(np.load(paths[name], mmap_mode="r"))
                                                       for name in ARRAYS)
        return document_index, sample_index, shuffle_index

    def _one_epoch(self) -> dict[str, np.ndarray]:
        """megatron-core's own construction for num_epochs == 1 (same arrays, same seed use)."""
        rng = np.random.RandomState(self.config.random_seed)
        document_index = gpt._build_document_index(self.indices, 1, rng, False)
        drop_last = (self.config.drop_last_partial_validation_sequence
                     if self.index_split == Split.valid else True)
        sample_index = helpers.build_sample_idx(
            self.dataset.sequence_lengths, document_index, self.config.sequence_length, 1,
            self._get_num_tokens_per_epoch(), drop_last, self.config.add_extra_token_to_sequence)
        samples = sample_index.shape[0] - 1
        shuffle_index = gpt._build_shuffle_index(samples, samples, rng)
        return {"document_index": document_index, "sample_index": sample_index, "shuffle_index": shuffle_index}

    def _save(self, arrays: dict[str, np.ndarray], paths: dict[str, str], description: str) -> None:
        temps: list[str] = []
        try:
            for name in ARRAYS:
                temps.append(temp_name(paths[name]))
                with open(temps[-1], "wb") as f:
                    np.save(f, arrays[name], allow_pickle=False)
                os.replace(temps[-1], paths[name])
            temps.append(temp_name(description))
            with open(temps[-1], "w") as f:
                f.write(self.unique_description)
            os.replace(temps[-1], description)  # last: marks the set complete
        except OSError as e:
            raise DataError(f"{self.config.path_to_cache}: cannot write index maps ({e.strerror}); "
                            "fix: set data.cache_dir to a writable directory") from None
        finally:
            remove(*temps)

