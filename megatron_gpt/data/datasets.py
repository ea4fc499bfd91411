"""Training/validation datasets: weighted blends of whole-document splits of preprocessed
prefixes, in a deterministic order that makes data parallelism and resume exact.

Three layers, none of which depends on how many samples the run will draw:
- a component is one epoch of one split of one prefix: megatron-core's GPTDataset with its
  index maps cached safely across ranks and nodes (index_maps.py);
- a component is repeated epoch after epoch, every later epoch in a fresh order seeded by
  (seed, epoch, component);
- a blend maps global sample i to (component, sample) with megatron-core's greedy blending
  (helpers.build_blending_indices): after any number of samples each component's share is as
  close to its weight as it can be.
So the first N samples are the same whatever training.train_steps is (megatron-core's
BlendedDataset, whose per-dataset sizes and epochs scale with the run's length, is not), and a
run resumed or extended from step k draws exactly what an uninterrupted run would.

Sample order: optimizer step t consumes global samples [t*G, (t+1)*G) with G the global batch;
data-parallel rank r takes the contiguous block of micro*grad_accum samples starting at
t*G + r*micro*grad_accum. A run of 1 rank and a run of N ranks with the same global batch
therefore see exactly the same samples per step, and resuming at step t needs only t (the
checkpoint's step and consumed_samples).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional

import numpy as np
import torch

from megatron_gpt.config.schema import DataConfig
from megatron_gpt.data.errors import DataError
from megatron_gpt.data.index_maps import EpochDataset, barrier, filesystem_leader
from megatron_gpt.data.indexed import IndexedFile, open_indexed, read_meta
from megatron_gpt.data.sft import loss_mask_twin

with warnings.catch_warnings():  # megatron-core warns about missing GPU extras on import
    warnings.simplefilter("ignore")
    from megatron.core.datasets import helpers
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from megatron.core.datasets.utils import Split

SPLIT_NAMES = ("train", "validation", "test")


class _MegatronTokenizerView:
    """The few attributes GPTDataset reads from a tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.eod = tokenizer.eod
        self.pad = tokenizer.pad
        self.vocab_size = tokenizer.vocab_size
        self.unique_identifiers = tokenizer.unique_identifiers


@dataclass(frozen=True)
class Source:
    """One split of one prefix, as a fraction of its documents, with its blend weight."""

    prefix: str
    key: str
    """The config key that named the prefix (for messages)."""
    split: int
    """0 train, 1 validation, 2 test."""
    bookends: tuple[float, float]
    weight: Optional[float]


def plan(data: DataConfig) -> list[list[Source]]:
    """[train, validation, test] sources of `data` (data.paths cut by data.split, or per-split lists)."""
    if data.train_paths:
        lists = [(data.train_paths, data.train_weights), (data.valid_paths, data.valid_weights),
                 (data.test_paths, data.test_weights)]
        return [[Source(p, f"data.{name}_paths", s, (0.0, 1.0), w[i] if w else None) for i, p in enumerate(paths)]
                for s, (name, (paths, w)) in enumerate(zip(("train", "valid", "test"), lists))]
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(data.split))
    w = data.weights
    return [[] if bookends is None else
            [Source(p, "data.paths", s, tuple(bookends), w[i] if w else None) for i, p in enumerate(data.paths)]
            for s, bookends in enumerate(matrix)]


def _check_prefix(prefix: str, key: str, tokenizer: Any) -> IndexedFile:
    """The checked .idx/.bin pair, which must have been made with `tokenizer` when it says so."""
    index = open_indexed(prefix, key)
    meta = read_meta(prefix)
    if meta is not None and "tokenizer_id" in meta:
        mine = json.loads(json.dumps(tokenizer.unique_identifiers))
        if meta["tokenizer_id"] != mine:
            raise DataError(f"{prefix}.meta.json: {prefix} was preprocessed with tokenizer {meta.get('tokenizer')} "
                            f"({meta['tokenizer_id']}), not the configured one ({mine}); fix: set tokenizer.* to "
                            f"the tokenizer it was made with, or preprocess it again with this one")
    if index.dtype == np.uint16 and tokenizer.vocab_size > 65536:
        raise DataError(f"{prefix}.idx: uint16 tokens cannot hold the configured tokenizer's {tokenizer.vocab_size:,} "
                        "ids, so it was made with another tokenizer; fix: set tokenizer.* to that tokenizer, "
                        "or preprocess it again")
    return index


class Blend(torch.utils.data.Dataset):
    """`size` samples drawn from `datasets` by weight, each dataset repeated epoch after epoch.
    `masks[i]` reads dataset i's per-token loss mask (SFT data; None: every token trained);
    `document_masking` adds position ids restarting after every end-of-document token."""

    def __init__(self, datasets: list[EpochDataset], weights: list[float], size: int, seed: int,
                 masks: Optional[list[Optional[EpochDataset]]] = None, document_masking: bool = False) -> None:
        self.datasets = datasets
        self.masks = masks if masks and any(m is not None for m in masks) else None
        self.document_masking = document_masking
        total = float(sum(weights))
        self.weights = [w / total for w in weights]
        self.size = size
        self.seed = seed
        self.dataset_index = np.zeros(size, dtype=np.int16)
        self.dataset_sample_index = np.zeros(size, dtype=np.int64)
        if len(datasets) == 1:
            self.dataset_sample_index[:] = np.arange(size)
        elif size:
            helpers.build_blending_indices(self.dataset_index, self.dataset_sample_index,
                                           np.asarray(self.weights, dtype=np.float64), len(datasets), size, False)
        self._keys = [int(d.unique_description_hash[:8], 16) for d in datasets]
        self._permutation = lru_cache(maxsize=4)(self._epoch_permutation)

    def _epoch_permutation(self, component: int, epoch: int) -> np.ndarray:
        n = len(self.datasets[component])
        rng = np.random.default_rng([self.seed, epoch, self._keys[component]])
        return rng.permutation(np.arange(n, dtype=np.uint32 if n < 2**32 else np.int64))

    def locate(self, index: int) -> tuple[int, int]:
        """(component, sample within its epoch order) of global sample `index`."""
        if not 0 <= index < self.size:
            raise IndexError(f"sample {index} is outside this blend of {self.size}")
        component = int(self.dataset_index[index])
        epoch, sample = divmod(int(self.dataset_sample_index[index]), len(self.datasets[component]))
        if epoch:
            sample = int(self._permutation(component, epoch)[sample])
        return component, sample

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        component, sample = self.locate(index)
        return self.datasets[component][sample]

    def batch(self, indices: range | list[int]) -> dict[str, torch.Tensor]:
        """The samples at `indices` stacked, as `__getitem__` makes them one by one: each sample's
        token ids from megatron-core's own lookup, then GPTDataset.__getitem__'s tensor work
        (shift, loss mask and id fix-up of padding) once for the whole batch. A dozen small
        tensor ops per sample cost ~1.5 ms of Python per small-model step; this costs ~0.2 ms.
        Training reads only this: it adds the SFT loss mask and the per-document position ids
        (document masking), which megatron-core's `__getitem__` knows nothing of."""
        texts, masks = [], []
        for index in indices:
            component, sample = self.locate(index)
            texts.append(self.datasets[component]._query_document_sample_shuffle_indices(sample)[0])
            if self.masks is not None:  # the same documents and offsets, read from the mask dataset
                twin = self.masks[component]
                masks.append(np.ones_like(texts[-1]) if twin is None else
                             twin._query_document_sample_shuffle_indices(sample)[0])
        text = torch.from_numpy(np.stack(texts))  # [batch, seq_length + 1] int64
        pad = self.datasets[0]._pad_token_id  # one tokenizer: the same for every component
        tokens, labels = text[:, :-1].clone(), text[:, 1:].clone()
        loss_mask = (labels != pad).float()
        if self.masks is not None:
            loss_mask *= torch.from_numpy(np.stack(masks))[:, 1:] == 1  # a label is trained where its token is
        batch = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask}
        if self.document_masking:
            batch["position_ids"] = document_positions(tokens, self.datasets[0].config.tokenizer.eod)
        tokens.masked_fill_(tokens == pad, 0)
        labels.masked_fill_(labels == pad, 0)
        return batch


def document_positions(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """Position ids [b, s] that restart at 0 after every end-of-document token (megatron-core's
    reset_position_ids); the model derives its block-diagonal attention mask from them."""
    seq = tokens.shape[1]
    starts = torch.zeros_like(tokens, dtype=torch.bool)
    starts[:, 0] = True
    starts[:, 1:] = tokens[:, :-1] == eod
    index = torch.arange(seq).expand_as(tokens)
    return index - torch.where(starts, index, 0).cummax(dim=1).values


def model_inputs(batch: dict[str, torch.Tensor]):
    """What the model takes from a collated batch: tokens, or (tokens, position_ids) when packed
    documents are masked from each other (model.gpt.GPT.forward)."""
    return (batch["tokens"], batch["position_ids"]) if "position_ids" in batch else batch["tokens"]


def _build_components(sources: list[Source], indexes: dict[str, IndexedFile], config: Any) -> list[EpochDataset]:
    seq_length = config.sequence_length
    datasets = []
    for source in sources:
        index = indexes[source.prefix]
        sequences = len(index.sequence_lengths)
        begin, end = (int(round(b * float(sequences))) for b in source.bookends)
        name = SPLIT_NAMES[source.split]
        if begin == end:
            where = f"data.split '{config.split}'" if source.key == "data.paths" else source.key
            raise DataError(f"{where} gives the {name} split of {source.prefix} no whole document (it has "
                            f"{index.documents}); fix: raise that split's weight or add documents")
        low_level = EpochDataset.build_low_level_dataset(source.prefix, config)
        split = (Split.train, Split.valid, Split.test)[source.split]
        dataset = EpochDataset(low_level, source.prefix, np.arange(begin, end, dtype=np.int32), None, split, config)
        if len(dataset) == 0:
            tokens = int(index.sequence_lengths[begin:end].sum(dtype=np.int64))
            raise DataError(f"{source.key}: the {name} split of {source.prefix} holds {tokens:,} tokens, fewer "
                            f"than one sample of model.seq_length {seq_length} + 1; fix: lower model.seq_length, "
                            "give that split more documents, or add data")
        datasets.append(dataset)
    return datasets


def build_datasets(data: DataConfig, seq_length: int, seed: int, tokenizer: Any, train_samples: int,
                   valid_samples: int, cache_dir: str) -> tuple[Blend, Blend]:
    """(train, validation) blends over `data`'s prefixes; `data.embedded` must already be resolved
    into data.paths. Collective when torch.distributed is up (every rank must call it)."""
    if data.embedded is not None:
        raise ValueError("build_datasets needs data.embedded resolved into data.paths (see prepare_embedded)")
    sources = plan(data)
    if not sources[1]:
        raise DataError(f"data.split '{data.split}' leaves no validation split, which evaluation needs; "
                        "fix: give validation a weight, e.g. \"969,30,1\"")
    indexes = {s.prefix: _check_prefix(s.prefix, s.key, tokenizer) for split in sources for s in split}
    index_dir = os.path.join(cache_dir, "index-maps")
    per_split = None if not data.train_paths else [
        ([s.prefix for s in split], None) if split else None for split in sources]
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, path_to_cache=index_dir,
        blend=None if per_split else (list(data.paths), None), blend_per_split=per_split,
        split=None if per_split else data.split, tokenizer=_MegatronTokenizerView(tokenizer),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
    )
    try:
        os.makedirs(index_dir, exist_ok=True)
    except OSError as e:
        raise DataError(f"{index_dir}: cannot create the index-map cache ({e.strerror}); "
                        "fix: set data.cache_dir to a writable directory") from None
    # One rank per filesystem builds the maps; the others wait, then load what it wrote.
    leader = filesystem_leader(index_dir)
    built: list[list[EpochDataset]] = []
    if leader:
        built = [_build_components(split, indexes, config) for split in sources[:2]]
    barrier()
    if not leader:
        built = [_build_components(split, indexes, config) for split in sources[:2]]
    blends = []
    for split, datasets, size in zip(sources, built, (train_samples, valid_samples)):
        weights = [s.weight if s.weight is not None else float(len(d)) for s, d in zip(split, datasets)]
        masks = [loss_mask_twin(d, s.prefix) for s, d in zip(split, datasets)]
        blends.append(Blend(datasets, weights, size, seed, masks, data.document_masking))
    return blends[0], blends[1]


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


def collate(dataset: Any, indices: range | list[int], device: torch.device) -> dict[str, torch.Tensor]:
    """tokens, labels and loss_mask of the samples at `indices`, stacked, on `device` (a Blend
    in one batched pass; any other dataset of such samples one sample at a time)."""
    if isinstance(dataset, Blend):
        batch = dataset.batch(indices)
    else:
        samples = [dataset[i] for i in indices]
        batch = {key: torch.stack([s[key] for s in samples]) for key in ("tokens", "labels", "loss_mask")
                 if key in samples[0]}
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def byte_lengths_table(tokenizer: Any, padded_vocab_size: int) -> torch.Tensor:
    """UTF-8 bytes per token id, zero for padding ids: the denominator of bits per byte."""
    table = np.zeros(padded_vocab_size, dtype=np.int64)
    lengths = np.asarray(tokenizer.token_byte_lengths(), dtype=np.int64)
    table[: len(lengths)] = lengths
    return torch.from_numpy(table)
