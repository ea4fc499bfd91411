"""Megatron's indexed dataset format (PREFIX.bin + PREFIX.idx), read and written with numpy only.

The format is megatron-core's (`IndexedDataset` reads what this writes; tests check it), but
writing it here keeps torch and megatron-core (seconds of import) out of preprocessing:

    .idx: b"MMIDIDX\\x00\\x00", u64 version 1, u8 dtype code, u64 sequence count, u64 document
          count, int32 lengths[sequences], int64 byte pointers[sequences], int64 document
          boundaries[documents] (sequence indices, starting with 0)
    .bin: the token ids of every sequence, back to back, in the .idx's dtype

Every output is written under a temp name and renamed once complete, the .idx last (after any
old .idx is removed), so an .idx on disk always describes a complete .bin. A sidecar
PREFIX.meta.json records the tokenizer and counts for `data inspect` and for training's checks.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Optional

import numpy as np

from megatron_gpt.data.errors import DataError

HEADER = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = len(HEADER) + 8 + 1 + 8 + 8
DTYPES: dict[int, type[np.integer[Any]]] = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
CODES = {np.dtype(t): c for c, t in DTYPES.items()}
META_SUFFIX = ".meta.json"


def token_dtype(vocab_size: int) -> type[np.integer[Any]]:
    """uint16 halves the file when every id fits; megatron-core reads the dtype from the .idx."""
    return np.uint16 if vocab_size <= 65536 else np.int32


def temp_name(path: str) -> str:
    """A sibling name unique to this process and call; renamed onto `path` when complete."""
    return f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove(*paths: str) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def leftover_temps(prefix: str) -> list[str]:
    """Temp files an interrupted writer of `prefix` left behind (never renamed, never read)."""
    parent = Path(prefix).parent
    stem = Path(prefix).name
    if not parent.is_dir():
        return []
    return sorted(str(p) for p in parent.iterdir()
                  if p.name.startswith(stem + ".") and ".tmp-" in p.name[len(stem):])


def _fsync_close(f: BinaryIO) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()


def write_meta(prefix: str, meta: dict[str, Any]) -> str:
    """PREFIX.meta.json under a temp name; returns the temp path (renamed by the caller)."""
    tmp = temp_name(prefix + META_SUFFIX)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.write("\n")
    return tmp


def read_meta(prefix: str) -> Optional[dict[str, Any]]:
    """The sidecar written by preprocess/merge, or None for datasets made by other tools."""
    path = prefix + META_SUFFIX
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable metadata ({e}); fix: delete it (it is optional) or rerun preprocess") from None


def _commit(prefix: str, tmp_bin: str, tmp_idx: str, tmp_meta: Optional[str]) -> None:
    remove(prefix + ".idx")  # an old .idx must never sit beside the new .bin
    os.replace(tmp_bin, prefix + ".bin")
    if tmp_meta is not None:
        os.replace(tmp_meta, prefix + META_SUFFIX)
    else:
        remove(prefix + META_SUFFIX)
    os.replace(tmp_idx, prefix + ".idx")  # last: its presence means the pair is complete


def _write_index(path: str, dtype: np.dtype, lengths: np.ndarray, documents: np.ndarray) -> None:
    itemsize = np.int64(dtype.itemsize)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1].astype(np.int64) * itemsize, out=pointers[1:])
    with open(path, "wb") as f:
        f.write(HEADER + struct.pack("<Q", VERSION) + struct.pack("<B", CODES[dtype]))
        f.write(struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(documents)))
        f.write(lengths.astype(np.int32).tobytes())
        f.write(pointers.tobytes())
        f.write(documents.astype(np.int64).tobytes())
        _fsync_close(f)


class IndexedWriter:
    """Stream documents into PREFIX.bin; `commit` writes PREFIX.idx (+ meta) and renames all.

    Until commit nothing exists under the final names; `abort` (or an exception inside a
    `with` block) removes the temp files.
    """

    def __init__(self, prefix: str, dtype: type[np.integer[Any]]) -> None:
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        os.makedirs(os.path.dirname(os.path.abspath(prefix)) or ".", exist_ok=True)
        self.tmp_bin = temp_name(prefix + ".bin")
        self.tmp_idx = temp_name(prefix + ".idx")
        self._bin: Optional[BinaryIO] = open(self.tmp_bin, "wb")
        self._lengths: list[np.ndarray] = []
        self.documents = 0
        self.tokens = 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray, join: bool = False) -> None:
        """Append documents: `tokens` back to back (already in the dtype), `lengths` per document.
        `join`: the first of them continues the last document added (a long document's pieces)."""
        assert self._bin is not None and tokens.dtype == self.dtype
        self._bin.write(memoryview(np.ascontiguousarray(tokens)))
        lengths = np.asarray(lengths, dtype=np.int32)
        if join and self._lengths and len(lengths):
            last = self._lengths[-1] = self._lengths[-1].copy()
            if int(last[-1]) + int(lengths[0]) >= 2**31:
                raise DataError(f"{self.prefix}: one document of over 2^31 tokens does not fit the index format; "
                                "fix: split the document")
            last[-1] += lengths[0]
            lengths = lengths[1:]
        if len(lengths):  # never an empty array: the last one is the document a piece joins
            self._lengths.append(lengths)
        self.documents += len(lengths)
        self.tokens += int(tokens.size)

    def commit(self, meta: Optional[dict[str, Any]] = None) -> None:
        assert self._bin is not None
        _fsync_close(self._bin)
        self._bin = None
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, dtype=np.int32)
        _write_index(self.tmp_idx, self.dtype, lengths, np.arange(len(lengths) + 1, dtype=np.int64))
        tmp_meta = write_meta(self.prefix, meta) if meta is not None else None
        try:
            _commit(self.prefix, self.tmp_bin, self.tmp_idx, tmp_meta)
        finally:
            if tmp_meta is not None:
                remove(tmp_meta)

    def abort(self) -> None:
        if self._bin is not None:
            self._bin.close()
            self._bin = None
        remove(self.tmp_bin, self.tmp_idx)

    def __enter__(self) -> IndexedWriter:
        return self

    def __exit__(self, kind: object, *_: object) -> None:
        if kind is not None or self._bin is not None:
            self.abort()


@dataclass(frozen=True)
class IndexedFile:
    """A checked PREFIX.idx (arrays memory-mapped) whose PREFIX.bin has the size it describes."""

    prefix: str
    dtype: np.dtype
    sequence_lengths: np.ndarray
    sequence_pointers: np.ndarray
    document_indices: np.ndarray

    @property
    def documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def document(self, index: int) -> np.ndarray:
        """Token ids of document `index` (all its sequences)."""
        first, last = int(self.document_indices[index]), int(self.document_indices[index + 1])
        if first == last:
            return np.zeros(0, dtype=self.dtype)
        start = int(self.sequence_pointers[first])
        count = int(self.sequence_lengths[first:last].sum(dtype=np.int64))
        return np.fromfile(self.prefix + ".bin", dtype=self.dtype, count=count, offset=start)


def _fail(path: str, what: str, fix: str) -> DataError:
    return DataError(f"{path}: {what}; fix: {fix}")


def _check_entries(idx: str, lengths: np.ndarray, pointers: np.ndarray, doc_idx: np.ndarray, itemsize: int,
                   rerun: str) -> None:
    """Every entry, vectorized (~10 ms per million sequences): lengths >= 0, each sequence right
    after the previous one in the .bin (so pointers rise and stay inside it once its size
    matches), document boundaries rising. megatron-core reads whatever the index says."""
    bad = np.flatnonzero(lengths < 0)
    if len(bad):
        raise _fail(idx, f"sequence {int(bad[0]):,} has a negative length ({int(lengths[bad[0]])})", rerun)
    if len(pointers):
        expected = np.empty_like(pointers)
        expected[0] = 0
        np.cumsum(lengths[:-1].astype(np.int64) * itemsize, out=expected[1:])
        bad = np.flatnonzero(pointers != expected)
        if len(bad):
            i = int(bad[0])
            raise _fail(idx, f"sequence {i:,} points at byte {int(pointers[i]):,} of the .bin, but the sequences "
                             f"before it end at byte {int(expected[i]):,} (pointers out of order or out of range)", rerun)
    bad = np.flatnonzero(np.diff(doc_idx) < 0)
    if len(bad):
        raise _fail(idx, f"document boundary {int(bad[0]) + 1:,} goes backwards", rerun)


def open_indexed(prefix: str, key: str = "data.paths") -> IndexedFile:
    """Read and check PREFIX.idx against PREFIX.bin; any mismatch is a DataError naming the file.

    Catches what megatron-core would only hit mid-training (or never): a missing half of the
    pair, a truncated or foreign .idx, and a .bin shorter or longer than the .idx says.
    """
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    rerun = "rerun `megatron-gpt preprocess` for this prefix (or copy both files again)"
    for path in (bin_, idx):
        if not os.path.isfile(path):
            temps = leftover_temps(prefix)
            why = f" (leftover temp files {', '.join(temps)} show an interrupted preprocess)" if temps else ""
            raise _fail(path, f"does not exist (from {key}){why}",
                        f"run `megatron-gpt preprocess` to create {prefix}.bin/.idx, or correct the prefix")
    size = os.path.getsize(idx)
    with open(idx, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES or head[: len(HEADER)] != HEADER:
        raise _fail(idx, "not a Megatron index (bad header)", rerun)
    version, code, sequences, documents = struct.unpack("<QBQQ", head[len(HEADER):])
    if version != VERSION or code not in DTYPES:
        raise _fail(idx, f"unsupported index version {version} / dtype code {code}", rerun)
    expected = HEADER_BYTES + sequences * (4 + 8) + documents * 8
    if size < expected:
        raise _fail(idx, f"truncated: {size:,} bytes, but its header promises {sequences:,} sequences "
                         f"({expected:,} bytes)", rerun)
    raw = np.memmap(idx, mode="r", dtype=np.uint8)
    lengths = np.frombuffer(raw, dtype=np.int32, count=sequences, offset=HEADER_BYTES)
    pointers = np.frombuffer(raw, dtype=np.int64, count=sequences, offset=HEADER_BYTES + 4 * sequences)
    doc_idx = np.frombuffer(raw, dtype=np.int64, count=documents, offset=HEADER_BYTES + 12 * sequences)
    dtype = np.dtype(DTYPES[code])
    index = IndexedFile(prefix, dtype, lengths, pointers, doc_idx)
    if documents == 0 or doc_idx[0] != 0 or doc_idx[-1] != sequences:
        raise _fail(idx, "document boundaries do not cover its sequences (a corrupted index)", rerun)
    _check_entries(idx, lengths, pointers, doc_idx, dtype.itemsize, rerun)
    bin_size = os.path.getsize(bin_)
    want = int(pointers[-1]) + int(lengths[-1]) * dtype.itemsize if sequences else 0
    if bin_size != want:
        ends = pointers + lengths.astype(np.int64) * dtype.itemsize
        first_bad = int(np.searchsorted(ends, bin_size, side="right"))
        document = int(np.searchsorted(doc_idx, first_bad, side="right")) - 1
        detail = (f"is {bin_size:,} bytes but {idx} describes {want:,} bytes ({index.documents:,} documents); "
                  + (f"it is truncated from document {document:,} (byte {int(pointers[first_bad]):,}) on"
                     if bin_size < want else "it has extra bytes after the last document"))
        raise _fail(bin_, detail, rerun)
    return index


def merge(output_prefix: str, prefixes: list[str]) -> IndexedFile:
    """Concatenate datasets into OUTPUT (document boundaries kept, same dtype required)."""
    if not prefixes:
        raise DataError("merge: no input prefixes; fix: name two or more PREFIXes to merge")
    if os.path.abspath(output_prefix) in {os.path.abspath(p) for p in prefixes}:
        raise DataError(f"{output_prefix}: the merge output is also an input; fix: choose a new output prefix")
    parts = [open_indexed(p, key="merge input") for p in prefixes]
    dtype = parts[0].dtype
    for part in parts[1:]:
        if part.dtype != dtype:
            raise DataError(f"{part.prefix}.idx: token dtype {part.dtype} differs from {parts[0].prefix}.idx "
                            f"({dtype}); fix: merge only datasets preprocessed with the same tokenizer")
    meta = _merged_meta(prefixes)
    lengths = np.concatenate([p.sequence_lengths for p in parts])
    documents, offset = [np.zeros(1, dtype=np.int64)], 0
    for part in parts:
        documents.append(part.document_indices[1:] + offset)
        offset += len(part.sequence_lengths)
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)) or ".", exist_ok=True)
    tmp_bin, tmp_idx = temp_name(output_prefix + ".bin"), temp_name(output_prefix + ".idx")
    tmp_meta = None
    try:
        with open(tmp_bin, "wb") as out:
            for part in parts:
                with open(part.prefix + ".bin", "rb") as src:
                    shutil.copyfileobj(src, out, 16 << 20)
            _fsync_close(out)
        _write_index(tmp_idx, dtype, lengths, np.concatenate(documents))
        if meta is not None:
            meta.update(documents=int(sum(p.documents for p in parts)), tokens=int(lengths.sum(dtype=np.int64)),
                        merged_from=[os.path.abspath(p) for p in prefixes])
            tmp_meta = write_meta(output_prefix, meta)
        _commit(output_prefix, tmp_bin, tmp_idx, tmp_meta)
    finally:
        remove(tmp_bin, tmp_idx, *([tmp_meta] if tmp_meta else []))
    return open_indexed(output_prefix)


def _merged_meta(prefixes: list[str]) -> Optional[dict[str, Any]]:
    """The inputs' common tokenizer metadata; None when any input has none (made elsewhere)."""
    metas = [read_meta(p) for p in prefixes]
    if any(m is None for m in metas):
        return None
    first = metas[0]
    assert first is not None
    for prefix, meta in zip(prefixes[1:], metas[1:]):
        assert meta is not None
        if meta.get("tokenizer_id") != first.get("tokenizer_id"):
            raise DataError(f"{prefix}{META_SUFFIX}: tokenizer {meta.get('tokenizer_id')} differs from "
                            f"{prefixes[0]}{META_SUFFIX} ({first.get('tokenizer_id')}); "
                            "fix: merge only datasets preprocessed with the same tokenizer")
    keep = ("tokenizer", "tokenizer_id", "vocab_size", "eod", "dtype")
    return {k: first[k] for k in keep if k in first} | {"append_eod": all(m.get("append_eod") for m in metas if m)}
