"""Training/validation datasets through megatron-core's GPTDataset, and the deterministic
sample order that makes data parallelism and resume exact.

Sample order: optimizer step t consumes global samples [t*G, (t+1)*G) with G the global batch;
data-parallel rank r takes the contiguous block of micro*grad_accum samples starting at
t*G + r*micro*grad_accum. A run of 1 rank and a run of N ranks with the same global batch
therefore see exactly the same samples per step, and resuming at step t needs only t.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megatron_gpt.data.errors import DataError

SPLIT_NAMES = ("train", "validation", "test")


class _MegatronTokenizerView:
    """The few attributes GPTDataset reads from a tokenizer."""

    def __init__(self, tokenizer):
        self.eod = tokenizer.eod
        self.pad = tokenizer.pad
        self.vocab_size = tokenizer.vocab_size
        self.unique_identifiers = tokenizer.unique_identifiers


def _split_document_counts(prefix: str, split_matrix) -> list[int]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    documents = len(IndexedDataset(prefix).document_indices) - 1
    counts = []
    for bookends in split_matrix:
        if bookends is None:
            counts.append(0)
        else:
            counts.append(int(round(bookends[1] * documents)) - int(round(bookends[0] * documents)))
    return counts


def build_datasets(prefixes: list[str], split: str, seq_length: int, seed: int, tokenizer,
                   train_samples: int, valid_samples: int, cache_dir: str):
    """(train, validation) GPTDatasets over whole-document splits of every prefix.

    Collective when torch.distributed is up: megatron-core builds the index maps on rank 0, then
    the other ranks load them after a barrier."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    for prefix in prefixes:
        for ext in (".bin", ".idx"):
            if not Path(prefix + ext).exists():
                raise DataError(f"data.paths: {prefix}{ext} does not exist; fix: run `megatron-gpt preprocess` "
                                f"to create {prefix}.bin/.idx or correct the prefix")
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=(list(prefixes), None), split=split,
        path_to_cache=str(Path(cache_dir) / "index-maps"), tokenizer=_MegatronTokenizerView(tokenizer),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False,
    )
    # megatron-core loops forever on a split that holds no document: refuse it with a message,
    # and drop the test split (never read during training) when it is empty.
    for prefix in prefixes:
        counts = _split_document_counts(prefix, config.split_matrix)
        for index, name in enumerate(SPLIT_NAMES[:2]):
            if counts[index] == 0:
                raise DataError(f"data.split '{split}' gives the {name} split of {prefix} no whole document "
                                f"(it has {sum(counts)}); fix: raise that split's weight or add documents")
        if counts[2] == 0:
            config.split_matrix[2] = None
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [train_samples, valid_samples, None], lambda: True, config).build()
    return train, valid


@dataclass(frozen=True)
class SampleOrder:
    """Which dataset indices each rank reads for each step (see the module docstring)."""

    micro_batch_size: int
    gradient_accumulation_steps: int
    data_parallel_size: int
    data_parallel_rank: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps * self.data_parallel_size

    def micro_batch_indices(self, step: int, micro: int) -> range:
        start = (step * self.global_batch_size
                 + self.data_parallel_rank * self.micro_batch_size * self.gradient_accumulation_steps
                 + micro * self.micro_batch_size)
        return range(start, start + self.micro_batch_size)


def collate(dataset, indices, device: torch.device) -> dict[str, torch.Tensor]:
    samples = [dataset[i] for i in indices]
    return {key: torch.stack([s[key] for s in samples]).to(device, non_blocking=True)
            for key in ("tokens", "labels", "loss_mask")}


def byte_lengths_table(tokenizer, padded_vocab_size: int) -> torch.Tensor:
    """UTF-8 bytes per token id, zero for padding ids: the denominator of bits per byte."""
    table = np.zeros(padded_vocab_size, dtype=np.int64)
    lengths = np.asarray(tokenizer.token_byte_lengths(), dtype=np.int64)
    table[: len(lengths)] = lengths
    return torch.from_numpy(table)
