"""tiktoken encodings by name (gpt2, cl100k_base, o200k_base, ...), from local files only.

tiktoken downloads an encoding's BPE file on first use; nothing may download here. So the
encoding's own constructor (tiktoken_ext.openai_public, which knows the pattern and special
tokens) runs with its file loader swapped for one that only looks in local places:

1. ``path``: a ``.tiktoken`` file (any encoding's ranks), or a directory holding the files under
   their original names (``cl100k_base.tiktoken``; ``vocab.bpe`` + ``encoder.json`` for gpt2);
2. a tiktoken cache directory (``cache_dir``, else $TIKTOKEN_CACHE_DIR, $DATA_GYM_CACHE_DIR, or
   tiktoken's default under the temp dir), where a file is named by the sha1 of its URL and
   must match the sha256 tiktoken expects.

When neither has it, the DataError names the URL, the file name and where to put it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import tempfile
import threading
from collections.abc import Callable
from typing import Any, Optional

from megatron_gpt.data.errors import DataError

_SWAP_LOCK = threading.Lock()


def default_cache_dir() -> str:
    """tiktoken's own cache directory rule."""
    return (os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
            or os.path.join(tempfile.gettempdir(), "data-gym-cache"))


def cache_name(url: str) -> str:
    """The file name tiktoken caches `url` under."""
    return hashlib.sha1(url.encode()).hexdigest()


def read_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """A .tiktoken file: one "base64(token) rank" per line."""
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
        return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines if line)}
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a .tiktoken file ({e}); fix: set tokenizer.path to an encoding's "
                        ".tiktoken file (lines of base64 token and rank)") from None


def write_tiktoken_ranks(ranks: dict[bytes, int], path: str) -> None:
    """The inverse of read_tiktoken_ranks (tiktoken's own format)."""
    with open(path, "wb") as f:
        for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
            f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")


class _LocalFiles:
    """Where each URL an encoding asks for is found locally; records the files used."""

    def __init__(self, name: str, path: Optional[str], cache_dir: Optional[str]) -> None:
        self.name, self.path = name, path
        self.cache_dir = cache_dir or default_cache_dir()
        self.used: dict[str, str] = {}  # url -> local file

    def find(self, url: str, expected_sha256: Optional[str]) -> str:
        if self.path and os.path.isdir(self.path):
            candidate = os.path.join(self.path, os.path.basename(url))
            if os.path.isfile(candidate):
                self.used[url] = candidate
                return candidate
        cached = os.path.join(self.cache_dir, cache_name(url))
        if os.path.isfile(cached):
            with open(cached, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            if expected_sha256 and digest != expected_sha256:
                raise DataError(f"{cached}: cached copy of {url} has sha256 {digest[:12]}..., not the expected "
                                f"{expected_sha256[:12]}...; fix: delete it and put the right file there")
            self.used[url] = cached
            return cached
        where = f"in {self.path} as {os.path.basename(url)}, " if self.path and os.path.isdir(self.path) else ""
        raise DataError(
            f"tokenizer.name {self.name}: no local copy of {url} (sha256 {expected_sha256 or 'unknown'}) and "
            f"nothing is downloaded here; fix: download that file where there is internet and set tokenizer.path "
            f"to it (or to a directory holding it as {os.path.basename(url)}), or put it {where}in {self.cache_dir} "
            f"as {cache_name(url)} (tiktoken's cache name; set tokenizer.cache_dir or TIKTOKEN_CACHE_DIR)")

    def tiktoken_bpe(self, url: str, expected_hash: Optional[str] = None) -> dict[bytes, int]:
        if self.path and os.path.isfile(self.path):
            self.used[url] = self.path
            return read_tiktoken_ranks(self.path)
        return read_tiktoken_ranks(self.find(url, expected_hash))

    def data_gym(self, vocab_bpe_file: str, encoder_json_file: str, vocab_bpe_hash: Optional[str] = None,
                 encoder_json_hash: Optional[str] = None) -> dict[bytes, int]:
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks

        if self.path and os.path.isfile(self.path):
            if not self.path.endswith(".tiktoken"):
                raise DataError(f"{self.path}: tokenizer.name {self.name} needs vocab.bpe + encoder.json or a "
                                ".tiktoken file; fix: set tokenizer.path to a directory holding vocab.bpe and "
                                "encoder.json, or to a .tiktoken file of the same ranks")
            self.used[vocab_bpe_file] = self.path
            return read_tiktoken_ranks(self.path)
        vocab = self.find(vocab_bpe_file, vocab_bpe_hash)
        encoder = self.find(encoder_json_file, encoder_json_hash)
        return data_gym_to_mergeable_bpe_ranks(vocab, encoder)


def encoding_spec(name: str, path: Optional[str], cache_dir: Optional[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """(tiktoken's constructor dict for `name`, {url: local file used}); never touches the network."""
    from tiktoken_ext import openai_public

    constructor: Optional[Callable[[], dict[str, Any]]] = openai_public.ENCODING_CONSTRUCTORS.get(name)
    if constructor is None:
        names = ", ".join(openai_public.ENCODING_CONSTRUCTORS)
        raise DataError(f"tokenizer.name {name!r} is not a tiktoken encoding; fix: use one of {names}")
    if path and not os.path.exists(path):
        raise DataError(f"{path}: file not found (from tokenizer.path); fix: set tokenizer.path to the "
                        f"{name} .tiktoken file or a directory holding it")
    files = _LocalFiles(name, path, cache_dir)
    # The constructors call these two module-level loaders; swap them for the local-only ones
    # for the duration of the call (a lock keeps concurrent builds from seeing each other's swap).
    with _SWAP_LOCK:
        saved = openai_public.load_tiktoken_bpe, openai_public.data_gym_to_mergeable_bpe_ranks
        openai_public.load_tiktoken_bpe, openai_public.data_gym_to_mergeable_bpe_ranks = files.tiktoken_bpe, files.data_gym
        try:
            spec = constructor()
        finally:
            openai_public.load_tiktoken_bpe, openai_public.data_gym_to_mergeable_bpe_ranks = saved
    return spec, files.used
