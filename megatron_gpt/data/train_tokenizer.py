"""Train a byte-level BPE tokenizer (HF `tokenizers`) on JSONL documents, written atomically."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

from megatron_gpt.data.errors import DataError
from megatron_gpt.data.reader import JsonlReader
from megatron_gpt.data.tokenizer import EOD_TOKEN

MIN_VOCAB_SIZE = 257  # the 256 byte tokens plus <|endoftext|>


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write to a temp file in the same directory, then rename: readers see all or nothing."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the result should read like any other file
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def train_tokenizer(inputs: list[str], output: str, vocab_size: int, json_key: str = "text") -> None:
    """Train a byte-level BPE of `vocab_size` ids (including EOD_TOKEN) and save it as tokenizer.json.

    Deterministic for the same inputs: the embedded tokenizer asset is rebuilt with this.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(f"vocab size {vocab_size} is too small; fix: use at least {MIN_VOCAB_SIZE} (256 bytes + {EOD_TOKEN})")
    reader = JsonlReader(inputs, json_key)
    documents = 0

    def counted() -> Iterator[str]:
        nonlocal documents
        for text in reader:
            documents += 1
            yield text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable, seen or not
        show_progress=False,
    )
    tok.train_from_iterator(counted(), trainer)
    if documents == 0:
        raise DataError(f"{', '.join(inputs)}: no non-empty {json_key!r} documents; fix: check the files and --json-key")
    atomic_write_bytes(output, tok.to_str().encode("utf-8"))
