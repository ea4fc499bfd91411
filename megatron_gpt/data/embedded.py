"""Corpora bundled in the package, preprocessed into a cache directory on first use.

The cache directory name carries a hash of the corpus and tokenizer asset bytes, so a changed
asset gets a fresh dataset instead of a stale one. An fcntl lock makes concurrent callers
(every rank of a run, several runs) build it once and all return the same files.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Optional

from megatron_gpt.config.schema import TokenizerConfig
from megatron_gpt.data.errors import DataError
from megatron_gpt.data.tokenizer import EMBEDDED_TOKENIZER_PATH

ASSETS_DIR = Path(__file__).with_name("assets")
CORPORA = {"shakespeare": "shakespeare.jsonl.xz"}
# Bump when preprocessing writes different files for the same assets (part of the cache name).
PREPROCESS_VERSION = 1


def default_cache_dir() -> str:
    """$MEGATRON_GPT_CACHE, else ~/.cache/megatron_gpt."""
    return os.environ.get("MEGATRON_GPT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "megatron_gpt")


def embedded_corpus_path(name: str) -> Path:
    """The bundled .jsonl.xz of corpus `name`."""
    if name not in CORPORA:
        raise DataError(f"unknown embedded corpus {name!r}; fix: set data.embedded to one of {', '.join(CORPORA)}")
    path = ASSETS_DIR / CORPORA[name]
    for asset in (path, EMBEDDED_TOKENIZER_PATH):
        if not asset.is_file():
            raise DataError(f"{asset}: embedded asset missing; fix: reinstall megatron-gpt or run tools/build_embedded_assets.py")
    return path


def _assets_hash(corpus: Path) -> str:
    h = hashlib.sha256(f"preprocess-v{PREPROCESS_VERSION}\0".encode())
    for asset in (corpus, EMBEDDED_TOKENIZER_PATH):
        h.update(hashlib.sha256(asset.read_bytes()).digest())
    return h.hexdigest()[:12]


def _complete(prefix: str) -> bool:
    # preprocess renames .idx last, so an .idx means the pair is whole.
    return os.path.isfile(prefix + ".idx") and os.path.isfile(prefix + ".bin")


def prepare_embedded(name: str, cache_dir: Optional[str] = None, *, progress: bool = False,
                     tokenizer: Optional[TokenizerConfig] = None) -> str:
    """Dataset prefix (PREFIX.bin/.idx) of embedded corpus `name`, preprocessing it if needed.

    `cache_dir` None means default_cache_dir(). `tokenizer`: the run's tokenizer when it is not
    the embedded one (finetuning GPT-2 on the bundled corpus needs GPT-2's ids); its identity
    (file hashes) is part of the cache name. Safe to call from many processes at once.
    """
    corpus = embedded_corpus_path(name)
    other = tokenizer is not None and tokenizer.type != "embedded"
    built = None
    label = f"{name}-{_assets_hash(corpus)}"
    if other:
        from megatron_gpt.data.tokenizer import build_tokenizer

        built = build_tokenizer(tokenizer)
        identity = json.dumps(built.unique_identifiers, sort_keys=True, default=str).encode()
        label += f"-{tokenizer.type}-{hashlib.sha256(identity).hexdigest()[:12]}"
    directory = os.path.join(cache_dir or default_cache_dir(), "embedded", label)
    prefix = os.path.join(directory, "text_document")
    if _complete(prefix):
        return prefix
    try:
        os.makedirs(directory, exist_ok=True)
        lock = open(os.path.join(directory, ".lock"), "a")
    except OSError as e:
        raise DataError(
            f"{directory}: cannot create the embedded-corpus cache ({e.strerror}); "
            "fix: set data.cache_dir or $MEGATRON_GPT_CACHE to a writable directory"
        ) from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, even if we crash
        if not _complete(prefix):  # another process may have built it while we waited
            from megatron_gpt.data.preprocess import preprocess
            from megatron_gpt.data.tokenizer import build_tokenizer

            built = built or build_tokenizer(TokenizerConfig(type="embedded"))
            preprocess([str(corpus)], prefix, built, append_eod=True, workers=1, progress=progress)
    return prefix
