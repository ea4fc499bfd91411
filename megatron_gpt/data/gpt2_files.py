"""GPT-2's own tokenizer files (encoder.json + vocab.bpe): read them fast, write them from a
byte-level BPE tokenizer.json.

Writing lets a locally trained BPE run through every GPT-2 code path (tokenizer.type gpt2bpe,
tiktoken, GPT-NeoX's GPT2BPETokenizer) offline: the tests and bench/preprocess.py use it when
the real GPT-2 files are not at hand.
"""

from __future__ import annotations

import json
import os

from megatron_gpt.data.errors import DataError

EOD_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (EOD_TOKEN, "<|startoftext|>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


BYTE_TO_UNICODE: dict[int, str] = _bytes_to_unicode()
UNICODE_TO_BYTE: dict[str, int] = {c: b for b, c in BYTE_TO_UNICODE.items()}
# One C-level str.translate turns a vocabulary string into its bytes (via latin-1).
_TO_LATIN1 = str.maketrans({c: chr(b) for b, c in BYTE_TO_UNICODE.items()})
# tiktoken's (and GPT-2's) rank order of the single bytes: the printable ones first.
BYTE_RANKS = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
BYTE_RANKS += [b for b in range(256) if b not in BYTE_RANKS]


def gpt2_ranks(vocab_bpe: str, encoder_json: str) -> tuple[dict[bytes, int], dict[str, int]]:
    """(tiktoken mergeable ranks, encoder.json) of GPT-2-format files.

    The same ranks and the same consistency check as tiktoken's data_gym_to_mergeable_bpe_ranks
    (single bytes first, then one rank per merge in merge order, and encoder.json agreeing), in a
    tenth of the time and without tiktoken's side copy of the files in its cache directory.
    """
    with open(encoder_json, encoding="utf-8") as f:
        encoder: dict[str, int] = json.load(f)
    with open(vocab_bpe, encoding="utf-8") as f:
        merges = [line.split() for line in f.read().split("\n")[1:] if line]
    fix = "fix: set tokenizer.vocab_file to encoder.json and tokenizer.merge_file to vocab.bpe of the same tokenizer"
    for rank, byte in enumerate(BYTE_RANKS):
        if encoder.get(BYTE_TO_UNICODE[byte]) != rank:
            raise DataError(f"{encoder_json}: byte {byte} has id {encoder.get(BYTE_TO_UNICODE[byte])}, not {rank} "
                            f"(GPT-2's byte order); {fix}")
    for i, pair in enumerate(merges):
        if len(pair) != 2 or encoder.get(pair[0] + pair[1]) != 256 + i:
            raise DataError(f"{vocab_bpe}:{i + 2}: merge {' '.join(pair)!r} should have id {256 + i} in "
                            f"{encoder_json} (merge order is rank order), not {encoder.get(''.join(pair))}; {fix}")
    ranks = {k.translate(_TO_LATIN1).encode("latin-1"): v for k, v in encoder.items() if k not in SPECIAL_TOKENS}
    if len(ranks) != 256 + len(merges):
        raise DataError(f"{encoder_json}: {len(ranks)} tokens, but vocab.bpe's {len(merges)} merges and 256 bytes "
                        f"make {256 + len(merges)}; {fix}")
    return ranks, encoder


def write_gpt2_files(tokenizer_json: str, directory: str) -> tuple[str, str]:
    """(encoder.json, vocab.bpe) in `directory`, encoding exactly like the tokenizer.json's BPE.

    GPT-2's rank order: the printable single bytes first (data-gym order), the other bytes after,
    then one rank per merge in merge order, then <|endoftext|>.
    """
    with open(tokenizer_json, encoding="utf-8") as f:
        merges = [m.split(" ") if isinstance(m, str) else m for m in json.load(f)["model"]["merges"]]
    encoder = {BYTE_TO_UNICODE[b]: i for i, b in enumerate(BYTE_RANKS)}
    for i, (a, b) in enumerate(merges):
        encoder[a + b] = 256 + i
    encoder[EOD_TOKEN] = 256 + len(merges)
    os.makedirs(directory, exist_ok=True)
    encoder_path, vocab_path = os.path.join(directory, "encoder.json"), os.path.join(directory, "vocab.bpe")
    with open(encoder_path, "w", encoding="utf-8") as f:
        json.dump(encoder, f, ensure_ascii=False)
    with open(vocab_path, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return encoder_path, vocab_path
