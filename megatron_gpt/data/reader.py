"""Read documents (one JSON object per line) from .jsonl, .jsonl.gz and .jsonl.xz files."""

from __future__ import annotations

import gzip
import json
import lzma
import os
from collections.abc import Iterator
from typing import BinaryIO

from megatron_gpt.data.errors import DataError

SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.xz")


def check_inputs(paths: list[str], key: str = "--input") -> None:
    """Fail early, before any work, on a missing file or an unsupported suffix."""
    if not paths:
        raise DataError(f"no input files given; fix: pass one or more {'/'.join(SUFFIXES)} files to {key}")
    for path in paths:
        if not path.endswith(SUFFIXES):
            raise DataError(
                f"{path}: unsupported input format; fix: give a file ending in {', '.join(SUFFIXES)}"
            )
        if not os.path.isfile(path):
            raise DataError(f"{path}: input file not found; fix: check the path given to {key}")


def _open(path: str) -> BinaryIO:
    if path.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if path.endswith(".xz"):
        return lzma.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


class JsonlReader:
    """Iterate the `json_key` strings of every line of every input, in order.

    Empty documents are skipped and counted in ``skipped_empty``; blank lines are ignored
    (a trailing newline is common). Anything else unexpected is a DataError naming FILE:LINE.
    """

    def __init__(self, paths: list[str], json_key: str = "text") -> None:
        check_inputs(paths)
        self.paths = list(paths)
        self.json_key = json_key
        self.skipped_empty = 0

    def __iter__(self) -> Iterator[str]:
        for path in self.paths:
            yield from self._read(path)

    def _read(self, path: str) -> Iterator[str]:
        key = self.json_key
        with _open(path) as f:
            # Binary lines, decoded one by one, so a decoding error can name its line.
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{where}: invalid UTF-8 ({e.reason}); fix: re-encode the file as UTF-8") from None
                try:
                    doc = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"{where}: invalid JSON ({e.msg} at column {e.colno}); "
                        "fix: make every line one complete JSON object"
                    ) from None
                if not isinstance(doc, dict):
                    raise DataError(
                        f"{where}: expected a JSON object, got {type(doc).__name__}; "
                        f'fix: write each document as {{"{key}": "..."}}'
                    )
                if key not in doc:
                    keys = ", ".join(sorted(doc)[:8]) or "none"
                    raise DataError(
                        f"{where}: missing key {key!r} (keys: {keys}); "
                        "fix: add it or choose the key holding the text with --json-key"
                    )
                text = doc[key]
                if not isinstance(text, str):
                    raise DataError(
                        f"{where}: {key!r} is {type(text).__name__}, not a string; "
                        "fix: store the document text as a JSON string"
                    )
                if not text:
                    self.skipped_empty += 1
                    continue
                yield text
