"""Tokenize JSONL corpora into megatron-core indexed datasets (PREFIX.bin + PREFIX.idx).

Both files are written under temp names next to the output and renamed .bin first, .idx last
(after removing any old .idx), so an .idx on disk always describes a complete .bin.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from megatron_gpt.data.errors import DataError
from megatron_gpt.data.reader import JsonlReader
from megatron_gpt.data.tokenizer import Tokenizer, build_tokenizer

BATCH_DOCS = 256  # documents per batch handed to the tokenizer (or to one worker)
BATCH_CHARS = 1 << 20  # ... or fewer, once the batch holds this many characters


@dataclass(frozen=True)
class PreprocessStats:
    documents: int
    """Documents written (empty ones excluded)."""
    tokens: int
    """Tokens written, EODs included."""
    bytes: int
    """UTF-8 bytes of the documents' text."""
    skipped_empty: int
    """Empty documents skipped."""
    seconds: float
    """Wall time of reading, tokenizing and writing (the one-off megatron-core import excluded)."""

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def summary(self) -> str:
        return (
            f"{self.documents:,} documents, {self.tokens:,} tokens, {self.bytes / 1e6:.1f} MB, "
            f"{self.skipped_empty:,} empty skipped, {self.seconds:.1f} s, {self.tokens_per_second:,.0f} tokens/s"
        )


def token_dtype(vocab_size: int) -> type[np.integer[Any]]:
    """uint16 halves the file when every id fits; megatron-core reads the dtype from the .idx."""
    return np.uint16 if vocab_size <= 65536 else np.int32


def _batches(texts: Iterable[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encode(tokenizer: Tokenizer, texts: list[str], append_eod: bool) -> tuple[list[np.ndarray], int]:
    """One batch -> (one id array per document, UTF-8 bytes of the batch)."""
    dtype = token_dtype(tokenizer.vocab_size)
    tail = [tokenizer.eod] if append_eod else []
    arrays = [np.array(ids + tail, dtype=dtype) for ids in tokenizer.encode_batch(texts)]
    return arrays, sum(len(t.encode("utf-8")) for t in texts)


# Worker state: each pool process rebuilds the tokenizer once from its picklable spec.
_worker_tokenizer: Optional[Tokenizer] = None
_worker_append_eod = True


def _init_worker(spec: Any, append_eod: bool) -> None:
    global _worker_tokenizer, _worker_append_eod
    # The processes already give the parallelism; nested Rust thread pools only oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = spec if isinstance(spec, Tokenizer) else build_tokenizer(spec)
    _worker_append_eod = append_eod


def _encode_in_worker(texts: list[str]) -> tuple[list[np.ndarray], int]:
    assert _worker_tokenizer is not None
    return _encode(_worker_tokenizer, texts, _worker_append_eod)


def _remove(*paths: str) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _import_builder() -> Any:
    with warnings.catch_warnings():  # megatron-core warns about missing GPU extras on import
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    return IndexedDatasetBuilder


def preprocess(
    inputs: list[str],
    output_prefix: str,
    tokenizer: Tokenizer,
    json_key: str = "text",
    append_eod: bool = True,
    workers: int = 1,
    progress: bool = True,
) -> PreprocessStats:
    """Tokenize every non-empty `json_key` document of `inputs` into `output_prefix`.bin/.idx.

    workers > 1 tokenizes batches in a process pool; the output is identical to workers=1.
    """
    import torch

    if workers < 1:
        raise DataError(f"workers is {workers}; fix: use 1 or more tokenizer processes")
    reader = JsonlReader(inputs, json_key)  # checks the inputs exist before any work
    dtype = token_dtype(tokenizer.vocab_size)
    bin_path, idx_path = output_prefix + ".bin", output_prefix + ".idx"
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    tag = f".tmp.{os.getpid()}.{time.monotonic_ns()}"
    tmp_bin, tmp_idx = bin_path + tag, idx_path + tag
    builder_cls = _import_builder()
    start = time.perf_counter()  # after the one-off library import (seconds), so rates compare

    pool: Any = None
    builder: Any = None
    bar: Any = None
    documents = tokens = nbytes = 0
    try:
        builder = builder_cls(tmp_bin, dtype=dtype)
        if progress:
            from tqdm import tqdm

            bar = tqdm(desc=os.path.basename(output_prefix), unit=" docs", file=sys.stderr, dynamic_ncols=True)
        batches = _batches(reader)
        if workers > 1:
            # spawn, not fork: the parent holds torch and Rust thread pools that fork would copy half-alive.
            ctx = multiprocessing.get_context("spawn")
            spec = getattr(tokenizer, "config", tokenizer)
            pool = ctx.Pool(workers, initializer=_init_worker, initargs=(spec, append_eod))
            results: Iterator[tuple[list[np.ndarray], int]] = pool.imap(_encode_in_worker, batches)
        else:
            results = (_encode(tokenizer, b, append_eod) for b in batches)
        for arrays, batch_bytes in results:
            for ids in arrays:
                builder.add_item(torch.from_numpy(ids))
                builder.end_document()
                tokens += ids.size
            documents += len(arrays)
            nbytes += batch_bytes
            if bar is not None:
                bar.update(len(arrays))
                bar.set_postfix_str(f"{nbytes / 1e6 / max(bar.format_dict['elapsed'], 1e-9):.1f} MB/s", refresh=False)
        builder.finalize(tmp_idx)
        _remove(idx_path)  # an old .idx must never sit beside the new .bin
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_idx, idx_path)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if bar is not None:
            bar.close()
        if builder is not None:
            builder.data_file.close()  # already closed on success; on failure, before the unlink
        _remove(tmp_bin, tmp_idx)
    return PreprocessStats(documents, tokens, nbytes, reader.skipped_empty, time.perf_counter() - start)
