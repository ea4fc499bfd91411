"""Read documents from corpus files: JSONL (plain, .gz, .xz, .zst), .txt and .parquet.

One record per JSON line or parquet row, holding one text per requested key; a .txt file is one
record whose text is the whole file. Anything unexpected is a DataError naming FILE:LINE (or
FILE:row N for parquet) and the fix.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import lzma
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, BinaryIO

from megatron_gpt.data.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.xz", ".jsonl.zst")
SUFFIXES = (*JSONL_SUFFIXES, ".txt", ".parquet")
OPTIONAL = {"zstandard": ".jsonl.zst", "pyarrow": ".parquet"}


def _require(module: str) -> Any:
    """Import an optional reader library, or say what to install."""
    try:
        return __import__(module)
    except ImportError:
        raise DataError(f"reading {OPTIONAL[module]} files needs the {module} package; "
                        f"fix: pip install {module} (or pip install 'megatron-gpt[data]')") from None


def check_inputs(paths: Sequence[str], key: str = "--input") -> None:
    """Fail early, before any work, on a missing file or an unsupported suffix."""
    if not paths:
        raise DataError(f"no input files given; fix: pass one or more {', '.join(SUFFIXES)} files to {key}")
    for path in paths:
        if not path.endswith(SUFFIXES):
            raise DataError(f"{path}: unsupported input format; fix: give a file ending in {', '.join(SUFFIXES)}")
        if not os.path.isfile(path):
            raise DataError(f"{path}: input file not found; fix: check the path given to {key}")


def expand_inputs(patterns: Sequence[str], key: str = "--input") -> list[str]:
    """Files and glob patterns (``**`` recurses) -> files in the order given, each pattern sorted."""
    paths: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise DataError(f"{pattern}: the pattern matches no file; fix: check the pattern given to {key}")
            paths.extend(matches)
        else:
            paths.append(pattern)
    check_inputs(paths, key)
    return paths


def _stream_errors(path: str) -> tuple[type[BaseException], ...]:
    """What a damaged or cut-short compressed input raises while being read."""
    errors: tuple[type[BaseException], ...] = (EOFError, OSError, lzma.LZMAError)
    return (*errors, _require("zstandard").ZstdError) if path.endswith(".zst") else errors


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


PIECE_CHARS = 1 << 20
"""A document longer than twice this is read (.txt) and tokenized in pieces of about this size,
so memory stays bounded whatever one document's size (tokenizers take ~100x a text's size)."""
# A safe cut: before one space or newline that sits between two non-space characters. Every
# whitespace-splitting pre-tokenizer (GPT-2 BPE, tiktoken, HF byte-level) starts a new pre-token
# there either way, so the pieces' tokens are the whole document's tokens.
_CUT_TEXT = re.compile(r"(?<=\S)(?=[ \n]\S)")
_CUT_BYTES = re.compile(rb"(?<=[^\s])(?=[ \n][^\s])")


class Piece(tuple):
    """A record holding part of one long document; `more`: the next record continues it."""

    more: bool

    def __new__(cls, text: str, more: bool) -> "Piece":
        piece = super().__new__(cls, (text,))
        piece.more = more
        return piece


def _cut(data, start: int, pattern) -> int:
    """Where to end a piece that starts at `start`: the first safe cut after PIECE_CHARS, else a
    hard cut at 8x (a text without spaces: only the tokens at that cut may differ), else the end."""
    match = pattern.search(data, start + PIECE_CHARS, start + 8 * PIECE_CHARS)
    if match:
        return match.start()
    return start + 8 * PIECE_CHARS if len(data) > start + 16 * PIECE_CHARS else len(data)


def split_document(text: str) -> list[Piece]:
    """A long text as Pieces (one piece when it is short)."""
    pieces, start = [], 0
    while len(text) - start > 2 * PIECE_CHARS:
        end = _cut(text, start, _CUT_TEXT)
        if end >= len(text):
            break
        pieces.append(Piece(text[start:end], True))
        start = end
    pieces.append(Piece(text[start:], False))
    return pieces


class CorpusReader:
    """Iterate records (one text per key, "" when empty) of every input, in order.

    `bytes_read()` / `total_bytes` give the on-disk progress (compressed bytes for compressed
    inputs) for a progress bar's ETA.
    """

    def __init__(self, paths: Sequence[str], keys: Sequence[str], key_flag: str = "--json-keys") -> None:
        self.paths = expand_inputs(paths)
        if not keys:
            raise DataError(f"no keys given; fix: name the key holding the text with {key_flag}")
        self.keys = tuple(keys)
        self.key_flag = key_flag
        if any(p.endswith(".txt") for p in self.paths) and len(self.keys) > 1:
            raise DataError(f"{next(p for p in self.paths if p.endswith('.txt'))}: a .txt file is one text, "
                            f"not {len(self.keys)} keys; fix: give one key with {key_flag}, or JSONL inputs")
        self.total_bytes = sum(os.path.getsize(p) for p in self.paths)
        self._done_bytes = 0
        self._position: Callable[[], int] = lambda: 0

    def bytes_read(self) -> int:
        return self._done_bytes + self._position()

    def __iter__(self) -> Iterator[tuple[str, ...]]:
        for path in self.paths:
            if path.endswith(".txt"):
                yield from self._read_txt(path)
            elif path.endswith(".parquet"):
                yield from self._read_parquet(path)
            else:
                yield from self._read_jsonl(path)
            self._done_bytes += os.path.getsize(path)
            self._position = lambda: 0

    @contextmanager
    def _open(self, path: str) -> Iterator[BinaryIO]:
        """The decompressed byte stream; progress follows the position in the file on disk."""
        with open(path, "rb") as raw:
            self._position = raw.tell
            if path.endswith(".gz"):
                stream: Any = gzip.GzipFile(fileobj=raw, mode="rb")
            elif path.endswith(".xz"):
                stream = lzma.LZMAFile(raw, "rb")
            elif path.endswith(".zst"):
                stream = io.BufferedReader(_require("zstandard").ZstdDecompressor().stream_reader(raw, closefd=False))
            else:
                stream = raw
            with stream:
                yield stream

    def _read_jsonl(self, path: str) -> Iterator[tuple[str, ...]]:
        keys = self.keys
        with self._open(path) as f:
            lineno = 0
            try:
                # Binary lines, decoded one by one, so a decoding error can name its line.
                for lineno, raw in enumerate(f, start=1):
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise DataError(f"{path}:{lineno}: invalid UTF-8 (byte {e.start + 1} of the line, {e.reason}); "
                                        "fix: re-encode the file as UTF-8") from None
                    try:
                        doc = json.loads(line)
                    except json.JSONDecodeError as e:
                        if not line.strip():
                            continue  # blank lines (a trailing newline is common)
                        raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno}); "
                                        "fix: make every line one complete JSON object") from None
                    if not isinstance(doc, dict):
                        raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(doc).__name__}; "
                                        f'fix: write each document as {{"{keys[0]}": "..."}}')
                    try:
                        texts = (doc[keys[0]],) if len(keys) == 1 else tuple([doc[k] for k in keys])
                    except KeyError as e:
                        have = ", ".join(sorted(doc)[:8]) or "none"
                        raise DataError(f"{path}:{lineno}: missing key {e.args[0]!r} (keys: {have}); "
                                        f"fix: add it, or choose the keys holding text with {self.key_flag}") from None
                    for key, text in zip(keys, texts):
                        if not isinstance(text, str):
                            raise DataError(f"{path}:{lineno}: {key!r} is {type(text).__name__}, not a string; "
                                            "fix: store the document text as a JSON string")
                    if "\\u" in line:  # only a \u escape can smuggle in a lone surrogate
                        self._check_surrogates(path, lineno, texts)
                    yield texts
            except _stream_errors(path) as e:
                raise DataError(f"{path}:{lineno + 1}: the compressed stream is damaged or cut short ({e}); "
                                "fix: recompress or re-download the file") from None

    @staticmethod
    def _check_surrogates(path: str, lineno: int, texts: tuple[str, ...]) -> None:
        for text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise DataError(f"{path}:{lineno}: a lone surrogate escape \\u{ord(text[e.start]):04x} is not "
                                "valid Unicode text; fix: repair or drop that string") from None

    def _read_txt(self, path: str) -> Iterator[tuple[str, ...]]:
        """One document, in Pieces when long: never more than ~20 MB of the file in memory."""
        with open(path, "rb") as f:
            self._position = f.tell
            data, lines, count, eof = b"", 0, 0, False
            while True:
                if not eof and len(data) < 16 * PIECE_CHARS:
                    block = f.read(4 * PIECE_CHARS)
                    if block:
                        data += block
                        continue
                    eof = True
                end = len(data) if eof and len(data) <= 2 * PIECE_CHARS else _cut(data, 0, _CUT_BYTES)
                piece, data = data[:end], data[end:]
                try:
                    text = piece.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{lines + _line_of(piece, e.start)}: invalid UTF-8 ({e.reason}); "
                                    "fix: re-encode the file as UTF-8") from None
                lines += piece.count(b"\n")
                last = eof and not data
                yield Piece(text, not last) if count or not last else (text,)
                count += 1
                if last:
                    return

    def _read_parquet(self, path: str) -> Iterator[tuple[str, ...]]:
        _require("pyarrow")
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: not a readable parquet file ({e}); fix: check or rewrite the file") from None
        schema = pf.schema_arrow
        for key in self.keys:
            if key not in schema.names:
                raise DataError(f"{path}: no column {key!r} (columns: {', '.join(schema.names[:8])}); "
                                f"fix: choose the columns holding text with {self.key_flag}")
            kind = schema.field(key).type
            if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
                raise DataError(f"{path}: column {key!r} is {kind}, not a string; fix: store the text as strings")
        total, row = max(pf.metadata.num_rows, 1), 0
        size = os.path.getsize(path)
        self._position = lambda: size * row // total
        for batch in pf.iter_batches(batch_size=4096, columns=list(self.keys)):
            columns = [batch.column(k).to_pylist() for k in self.keys]
            for texts in zip(*columns):
                row += 1
                if None in texts:
                    key = self.keys[texts.index(None)]
                    raise DataError(f"{path}:row {row}: {key!r} is null; fix: drop the row or store an empty string")
                yield texts


class JsonlReader:
    """The non-empty texts of one key of every input, in order; empty ones counted in
    ``skipped_empty``. (Any input format of CorpusReader, despite the historical name.)"""

    def __init__(self, paths: Sequence[str], json_key: str = "text") -> None:
        self._reader = CorpusReader(paths, [json_key], key_flag="--json-key")
        self.paths = self._reader.paths
        self.json_key = json_key
        self.skipped_empty = 0

    def __iter__(self) -> Iterator[str]:
        for (text,) in self._reader:
            if text:
                yield text
            else:
                self.skipped_empty += 1
