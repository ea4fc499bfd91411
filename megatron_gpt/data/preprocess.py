"""Tokenize corpora into megatron-core indexed datasets (PREFIX.bin + PREFIX.idx), fast.

One pass over the inputs writes one dataset per key, each from that key's own text. The main
process reads, parses and writes; tokenizing runs in-line for workers=1, else in `workers`
processes forked after the tokenizer is built. Forked, not spawned: no interpreter start-up,
imports or tokenizer rebuild per worker (a spawn pool cost ~1 s here), and the tokenizer needs
not be picklable. Processes, not threads, although every tokenizer here releases the GIL while
encoding: the GIL-bound rest (building id lists, converting them) makes threads collapse when the
machine's cores are shared (measured: 2 threads took 2-8x the single-thread time under load).
A caller that runs Python threads gets a thread pool instead, since fork would copy their locks
half-held. No torch or megatron-core import either: indexed.py writes the format with numpy.
Outputs appear only when complete (see indexed.py).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Optional

import numpy as np

from megatron_gpt.data.errors import DataError
from megatron_gpt.data.indexed import IndexedWriter, leftover_temps, token_dtype
from megatron_gpt.data.progress import Progress
from megatron_gpt.data.reader import PIECE_CHARS, CorpusReader, Piece, split_document
from megatron_gpt.data.tokenizer import Tokenizer

__all__ = ["PreprocessStats", "preprocess", "preprocess_keys", "token_dtype"]

BATCH_DOCS = 512  # records per batch handed to one worker
BATCH_CHARS = 1 << 20  # ... or fewer, once the batch holds this many characters
META_VERSION = 1


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
    """Wall time of reading, tokenizing and writing (tokenizer loading excluded)."""

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def summary(self) -> str:
        return (f"{self.documents:,} documents, {self.tokens:,} tokens, {self.bytes / 1e6:.1f} MB, "
                f"{self.skipped_empty:,} empty skipped, {self.seconds:.1f} s, {self.tokens_per_second:,.0f} tokens/s")


def _batches(records: Iterable[tuple[str, ...]]) -> Iterator[list[tuple[str, ...]]]:
    batch: list[tuple[str, ...]] = []
    chars = 0
    for record in records:
        batch.append(record)
        chars += len(record[0])
        if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


Encoded = tuple[np.ndarray, np.ndarray, int]  # tokens back to back, length per document, UTF-8 bytes


def _encode(tokenizer: Tokenizer, dtype: np.dtype, eod: Optional[int], texts: list[str],
            ends: Optional[list[bool]] = None) -> Encoded:
    """`ends[i]` False: text i is a piece continued by text i+1 (no EOD; one length for both)."""
    encoded = tokenizer.encode_in_thread(texts)
    ends = ends or [True] * len(texts)
    extra = [int(eod is not None and end) for end in ends]
    lengths = np.fromiter((len(ids) + e for ids, e in zip(encoded, extra)), dtype=np.int64, count=len(encoded))
    out = np.empty(int(lengths.sum()), dtype=dtype)
    end = 0
    for ids, e in zip(encoded, extra):
        start, end = end, end + len(ids)
        out[start:end] = ids  # lists convert straight into the output, no array per document
        if e:
            out[end] = eod
            end += 1
    nbytes = sum(len(t) if t.isascii() else len(t.encode("utf-8")) for t in texts)
    if not all(ends):  # pieces of one document: one length
        first = np.flatnonzero(np.r_[True, np.asarray(ends[:-1])])
        lengths = np.add.reduceat(lengths, first) if len(lengths) else lengths
    return out, lengths.astype(np.int32), nbytes


def _encode_columns(tokenizer: Tokenizer, dtype: np.dtype, eod: Optional[int], columns: list[list[str]],
                    ends: Optional[list[bool]] = None) -> list[Encoded]:
    return [_encode(tokenizer, dtype, eod, texts, ends if i == 0 else None) for i, texts in enumerate(columns)]


# The forked workers' encoding arguments: set in the parent just before the fork, inherited by
# the children (never pickled, so any tokenizer works).
_FORKED: Optional[tuple[Tokenizer, np.dtype, Optional[int]]] = None


_PARENT = 0


def _quiet_child() -> None:
    # Processes give the parallelism; HF tokenizers' own thread pool would only oversubscribe
    # (and it warns when it finds itself forked).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # Die with the parent, however it ends (kill -9, SIGTERM): a pool worker otherwise waits on
    # its queue forever under pid 1. PR_SET_PDEATHSIG is Linux's; elsewhere the pool's own
    # shutdown is all there is.
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass
    if os.getppid() != _PARENT:  # the parent died before prctl took effect
        os._exit(1)


def _forget_forked() -> None:
    global _FORKED
    _FORKED = None


def _encode_forked(columns: list[list[str]], ends: Optional[list[bool]] = None) -> list[Encoded]:
    assert _FORKED is not None
    return _encode_columns(*_FORKED, columns, ends)


class _InLine(Executor):
    """workers=1: encode in the calling thread, no pool at all."""

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def]  # Executor's signature
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:
            future.set_exception(e)
        return future


def _executor(workers: int, tokenizer: Tokenizer, dtype: np.dtype, eod: Optional[int]
              ) -> tuple[Executor, Callable[[list[list[str]]], list[Encoded]]]:
    """(executor, function of the columns of one batch) for `workers`."""
    global _FORKED, _PARENT
    _PARENT = os.getpid()
    encode = partial(_encode_columns, tokenizer, dtype, eod)
    if workers == 1:
        return _InLine(), encode
    if "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1:
        _FORKED = (tokenizer, dtype, eod)  # the pool forks all its workers at the first submit
        return ProcessPoolExecutor(workers, multiprocessing.get_context("fork"), _quiet_child), _encode_forked
    return ThreadPoolExecutor(workers, thread_name_prefix="tokenize"), encode


def _meta(tokenizer: Tokenizer, key: str, append_eod: bool, dtype: np.dtype, inputs: list[str],
          stats: PreprocessStats) -> dict[str, Any]:
    tok = tokenizer.config.model_dump(exclude_none=True)
    for field in ("path", "vocab_file", "merge_file", "cache_dir"):
        if field in tok:
            tok[field] = os.path.abspath(tok[field])
    return {"format": "megatron-gpt preprocess", "version": META_VERSION, "tokenizer": tok,
            "tokenizer_id": tokenizer.unique_identifiers, "vocab_size": tokenizer.vocab_size, "eod": tokenizer.eod,
            "append_eod": append_eod, "dtype": dtype.name, "json_key": key,
            "inputs": [os.path.abspath(p) for p in inputs], "documents": stats.documents, "tokens": stats.tokens,
            "bytes": stats.bytes, "skipped_empty": stats.skipped_empty}


@contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """SIGTERM raises SystemExit in the main thread, so the writers remove their temp files."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _pieces(records: Iterable[tuple[str, ...]]) -> Iterator[tuple[str, ...]]:
    """Single-key records with a long text become Pieces (reader.PIECE_CHARS): bounded memory."""
    for record in records:
        if isinstance(record, Piece) or len(record[0]) <= 2 * PIECE_CHARS:
            yield record
        else:
            yield from split_document(record[0])


def preprocess_keys(inputs: list[str], outputs: Mapping[str, str], tokenizer: Tokenizer, append_eod: bool = True,
                    workers: int = 1, progress: bool = True, allow_empty: bool = False) -> dict[str, PreprocessStats]:
    """Tokenize the non-empty text under each key of `outputs` into that key's prefix.bin/.idx.

    Inputs are files or glob patterns (reader.SUFFIXES). The output is identical for any `workers`.
    With one key, a long document is tokenized in pieces (memory stays bounded, see reader.Piece).
    No document at all is an error unless `allow_empty`.
    """
    if workers < 1:
        raise DataError(f"workers is {workers}; fix: use 1 or more tokenizer processes")
    keys = list(outputs)
    reader = CorpusReader(inputs, keys)  # checks the inputs exist before any work
    for prefix in outputs.values():
        if stale := leftover_temps(prefix):
            print(f"warning: leftover temp files of an interrupted run (safe to delete): {', '.join(stale)}",
                  file=sys.stderr)
    dtype = np.dtype(token_dtype(tokenizer.vocab_size))
    eod = tokenizer.eod if append_eod else None
    start = time.perf_counter()
    documents, skipped, nbytes = [0] * len(keys), [0] * len(keys), [0] * len(keys)
    label = os.path.basename(next(iter(outputs.values())))
    bar = Progress(label, reader.total_bytes) if progress else None
    pool, encode = _executor(workers, tokenizer, dtype, eod)
    with ExitStack() as stack, pool:
        stack.enter_context(_terminate_as_exit())
        writers = [stack.enter_context(IndexedWriter(outputs[k], dtype)) for k in keys]
        pending: deque[tuple[Future[list[Encoded]], bool]] = deque()

        def write_oldest() -> None:
            future, join = pending.popleft()
            for i, (tokens, lengths, batch_bytes) in enumerate(future.result()):
                writers[i].add(tokens, lengths, join=join and i == 0)
                documents[i] += len(lengths) - int(join and i == 0 and len(lengths) > 0)
                nbytes[i] += batch_bytes
            if bar is not None:
                bar.update(documents[0], writers[0].tokens, nbytes[0], reader.bytes_read())

        try:
            continued = False  # the previous batch ended inside a document
            for batch in _batches(_pieces(reader) if len(keys) == 1 else reader):
                columns = []
                for i in range(len(keys)):
                    texts = [record[i] for record in batch if record[i]]
                    skipped[i] += len(batch) - len(texts)
                    columns.append(texts)
                ends = [not getattr(record, "more", False) for record in batch if record[0]]
                pending.append((pool.submit(encode, columns, None if all(ends) else ends), continued))
                continued = not ends[-1] if ends else continued
                while len(pending) > 2 * workers:  # bounded memory, workers always busy
                    write_oldest()
            while pending:
                write_oldest()
            if not any(documents) and not allow_empty:
                raise DataError(f"{', '.join(reader.paths) or ', '.join(inputs)}: no non-empty document under "
                                f"{', '.join(repr(k) for k in keys)} ({skipped[0]:,} empty); nothing was written. fix: "
                                "check the inputs and --json-keys, or pass --allow-empty to write an empty dataset")
        except BaseException:
            for future, _ in pending:
                future.cancel()
            raise
        finally:
            _forget_forked()
        seconds = time.perf_counter() - start
        stats = {key: PreprocessStats(documents[i], writers[i].tokens, nbytes[i], skipped[i], seconds)
                 for i, key in enumerate(keys)}
        for i, key in enumerate(keys):
            writers[i].commit(_meta(tokenizer, key, append_eod, dtype, reader.paths, stats[key]))
    if bar is not None:
        bar.update(documents[0], writers[0].tokens, nbytes[0], reader.total_bytes, force=True)
        bar.close()
    return stats


def preprocess(inputs: list[str], output_prefix: str, tokenizer: Tokenizer, json_key: str = "text",
               append_eod: bool = True, workers: int = 1, progress: bool = True,
               allow_empty: bool = False) -> PreprocessStats:
    """Tokenize every non-empty `json_key` document of `inputs` into `output_prefix`.bin/.idx."""
    return preprocess_keys(inputs, {json_key: output_prefix}, tokenizer, append_eod, workers, progress,
                           allow_empty)[json_key]
