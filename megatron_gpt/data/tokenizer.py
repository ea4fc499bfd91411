"""Tokenizers behind one interface, all built offline from local files: HF tokenizer.json, GPT-2
BPE (encoder.json + vocab.bpe) and tiktoken encodings by name (both run by tiktoken),
SentencePiece .model, raw bytes, and the embedded corpus's BPE.

Every document is encoded as plain text: special-token strings inside a document (a literal
"<|endoftext|>") are encoded as ordinary text, never as the special id, so document boundaries
come only from the EOD that preprocessing appends, and token byte lengths always add up.
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from megatron_gpt.config.schema import TokenizerConfig
from megatron_gpt.data.errors import DataError
from megatron_gpt.data.gpt2_files import BYTE_TO_UNICODE, EOD_TOKEN, UNICODE_TO_BYTE, gpt2_ranks

__all__ = ["BYTE_TO_UNICODE", "EOD_TOKEN", "TOKENIZER_TYPES", "Tokenizer", "build_tokenizer"]

TOKENIZER_TYPES = ("embedded", "hf", "gpt2bpe", "tiktoken", "sentencepiece", "bytes")
PAD_TOKENS = ("<|padding|>", "<pad>", "[PAD]")
# The end-of-document token of a tokenizer.json, the first one it has: GPT-2/NeoX/ours, then
# Llama 3's end of text (it has no <|endoftext|>), then the SentencePiece-style eos (Llama 2, Mistral).
HF_EOD_TOKENS = (EOD_TOKEN, "<|end_of_text|>", "</s>")
EMBEDDED_TOKENIZER_PATH = Path(__file__).with_name("assets") / "shakespeare-bpe.json"


def file_sha256(path: str | os.PathLike[str]) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _require_file(path: Optional[str], key: str, what: str) -> str:
    if not path:
        raise DataError(f"config key {key} is not set; fix: set {key} to {what}")
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found (from {key}); fix: set {key} to {what}")
    return os.path.abspath(path)


def _as_int_list(ids: Sequence[int] | np.ndarray) -> list[int]:
    return np.asarray(ids, dtype=np.int64).reshape(-1).tolist()


class Tokenizer(ABC):
    """What preprocessing, datasets and training need from any tokenizer."""

    vocab_size: int
    """All ids are in [0, vocab_size)."""
    eod: int
    """End-of-document id, appended after every document."""
    pad: int = -1
    """Pad id, or -1 when there is none (megatron-core GPTDataset masks labels equal to it)."""
    config: TokenizerConfig
    """How to rebuild this tokenizer (preprocessing workers rebuild it from this)."""
    _byte_lengths: Optional[np.ndarray] = None

    @property
    @abstractmethod
    def unique_identifiers(self) -> dict[str, Any]:
        """Stable JSON-able description; megatron-core hashes it into index-cache names."""

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_in_thread(self, texts: list[str]) -> list[Sequence[int] | np.ndarray]:
        """encode_batch's ids (lists or integer arrays) computed in the calling thread: preprocessing
        runs many of these at once, so no nested thread pools, and the GIL released where possible."""
        return [self.encode(t) for t in texts]

    @abstractmethod
    def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...

    @abstractmethod
    def _compute_byte_lengths(self) -> np.ndarray: ...

    def token_byte_lengths(self) -> np.ndarray:
        """int64 [vocab_size]: UTF-8 bytes each id stands for (0 for special tokens).

        For bits-per-byte: sum(lengths[encode(text)]) == len(text.encode()). Read-only, cached.
        """
        if self._byte_lengths is None:
            lengths = np.ascontiguousarray(self._compute_byte_lengths(), dtype=np.int64)
            assert lengths.shape == (self.vocab_size,)
            lengths.flags.writeable = False
            self._byte_lengths = lengths
        return self._byte_lengths


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer.json (byte-level BPE gives exact byte lengths)."""

    def __init__(self, path: str, config: Optional[TokenizerConfig] = None, key: str = "tokenizer.path") -> None:
        from tokenizers import Tokenizer as HFTok

        self.path = _require_file(path, key, "a Hugging Face tokenizer.json")
        try:
            self._tok = HFTok.from_file(self.path)
        except Exception as e:  # the Rust side raises a bare Exception on a malformed file
            raise DataError(f"{self.path}: not a valid tokenizer.json ({e}); fix: point {key} at a tokenizer.json") from None
        # Special-token strings inside documents stay text (see module docstring).
        self._tok.encode_special_tokens = True
        self.config = config or TokenizerConfig(type="hf", path=self.path)
        self._sha256 = file_sha256(self.path)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        eod = next((i for t in HF_EOD_TOKENS if (i := self._tok.token_to_id(t)) is not None), None)
        if eod is None:
            raise DataError(
                f"{self.path}: the tokenizer has no {EOD_TOKEN} token (nor {' or '.join(HF_EOD_TOKENS[1:])}), "
                "which marks document ends; "
                f"fix: add {EOD_TOKEN} as a special token (e.g. train it with megatron-gpt train-tokenizer)"
            )
        self.eod = eod
        self.pad = next((i for t in PAD_TOKENS if (i := self._tok.token_to_id(t)) is not None), -1)

    @property
    def unique_identifiers(self) -> dict[str, Any]:
        return {"class": "HFTokenizer", "tokenizer_json_sha256": self._sha256}

    def encode(self, text: str) -> list[int]:
        # No BOS/EOS from a post-processor: preprocessing appends the EOD itself.
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]

    def encode_in_thread(self, texts: list[str]) -> list[Sequence[int] | np.ndarray]:
        return self.encode_batch(texts)  # Rust, GIL released (its own thread pool splits the batch)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._tok.decode(_as_int_list(ids), skip_special_tokens=False)

    def _compute_byte_lengths(self) -> np.ndarray:
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        added = self._tok.get_added_tokens_decoder()
        for i in range(self.vocab_size):
            if i in added:
                # Added tokens hold their text verbatim (not byte-level encoded).
                lengths[i] = 0 if added[i].special else len(added[i].content.encode("utf-8"))
                continue
            token = self._tok.id_to_token(i)
            if token is None:
                continue
            if all(c in UNICODE_TO_BYTE for c in token):
                lengths[i] = len(token)  # byte-level: one character per byte
            else:
                # Not byte-level (e.g. SentencePiece-style): best effort through the decoder.
                lengths[i] = len(self._tok.decode([i], skip_special_tokens=False).encode("utf-8"))
        return lengths


class _TiktokenTokenizer(Tokenizer):
    """Shared by the tiktoken-run BPEs: ordinary-text encoding, numpy fast path, byte lengths."""

    _enc: Any

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts)

    def encode_in_thread(self, texts: list[str]) -> list[Sequence[int] | np.ndarray]:
        # encode_ordinary releases the GIL (measured: encode_to_numpy does not, and is slower).
        return [self._enc.encode_ordinary(t) for t in texts]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._enc.decode(_as_int_list(ids))

    def _compute_byte_lengths(self) -> np.ndarray:
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        special = {self._enc.encode_single_token(t) for t in self._enc.special_tokens_set}
        for i in range(self.vocab_size):
            if i in special:
                continue
            try:
                lengths[i] = len(self._enc.decode_single_token_bytes(i))
            except KeyError:  # an unused id between the ranks and the special tokens
                pass
        return lengths


class GPT2BPETokenizer(_TiktokenTokenizer):
    """GPT-2 BPE (encoder.json + vocab.bpe) run by tiktoken, built from local files only."""

    def __init__(self, vocab_file: str, merge_file: str, config: Optional[TokenizerConfig] = None) -> None:
        import tiktoken
        from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's regex (faster equivalent form)

        self.vocab_file = _require_file(vocab_file, "tokenizer.vocab_file", "GPT-2's encoder.json")
        self.merge_file = _require_file(merge_file, "tokenizer.merge_file", "GPT-2's vocab.bpe (merges)")
        self.config = config or TokenizerConfig(type="gpt2bpe", vocab_file=self.vocab_file, merge_file=self.merge_file)
        self._hashes = {"encoder_json_sha256": file_sha256(self.vocab_file), "vocab_bpe_sha256": file_sha256(self.merge_file)}
        try:
            ranks, encoder = gpt2_ranks(self.merge_file, self.vocab_file)
        except DataError:
            raise
        except (UnicodeDecodeError, ValueError, AttributeError) as e:  # not JSON / not a mapping
            raise DataError(
                f"{self.vocab_file} and {self.merge_file} are not GPT-2 BPE files ({type(e).__name__} {e}); "
                "fix: set tokenizer.vocab_file to encoder.json and tokenizer.merge_file to vocab.bpe"
            ) from None
        self.eod = int(encoder.get(EOD_TOKEN, len(ranks)))  # 50256 for GPT-2
        self._enc = tiktoken.Encoding(
            "gpt2-local", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={EOD_TOKEN: self.eod}
        )
        self.vocab_size = max(max(ranks.values()), self.eod) + 1

    @property
    def unique_identifiers(self) -> dict[str, Any]:
        return {"class": "GPT2BPETokenizer", **self._hashes}


class TiktokenTokenizer(_TiktokenTokenizer):
    """A tiktoken encoding by name (cl100k_base, o200k_base, gpt2, ...) from local files only."""

    def __init__(self, name: Optional[str], path: Optional[str] = None, cache_dir: Optional[str] = None,
                 config: Optional[TokenizerConfig] = None) -> None:
        import tiktoken

        from megatron_gpt.data.tiktoken_files import encoding_spec

        if not name:
            raise DataError("config key tokenizer.name is not set; fix: set tokenizer.name to a tiktoken "
                            "encoding such as cl100k_base")
        spec, files = encoding_spec(name, path, cache_dir)
        specials: dict[str, int] = spec["special_tokens"]
        if EOD_TOKEN not in specials:
            raise DataError(f"tokenizer.name {name}: the encoding has no {EOD_TOKEN}, which marks document ends; "
                            "fix: use an encoding that has it (gpt2, r50k_base, p50k_base, cl100k_base, o200k_base)")
        self.config = config or TokenizerConfig(type="tiktoken", name=name, path=path, cache_dir=cache_dir)
        self.name = name
        self.eod = specials[EOD_TOKEN]
        ranks: dict[bytes, int] = spec["mergeable_ranks"]
        # Not spec's explicit_n_vocab: a local file of other ranks (tests, custom files) is allowed.
        self._enc = tiktoken.Encoding(f"{name}-local", pat_str=spec["pat_str"], mergeable_ranks=ranks,
                                      special_tokens=specials)
        self.vocab_size = max(max(ranks.values()), *specials.values()) + 1
        self._files = {os.path.basename(url): file_sha256(local) for url, local in files.items()}

    @property
    def unique_identifiers(self) -> dict[str, Any]:
        return {"class": "TiktokenTokenizer", "name": self.name, "files_sha256": self._files}


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece .model. The EOD is the model's <|endoftext|> piece if it has one, else its
    eos (</s>). SentencePiece normalizes text (and adds a leading "▁"), so decode(encode(t)) and
    the byte lengths of bits per byte are close to, not exactly, the raw text's."""

    def __init__(self, path: Optional[str], config: Optional[TokenizerConfig] = None) -> None:
        try:
            import sentencepiece
        except ImportError:
            raise DataError("tokenizer.type sentencepiece needs the sentencepiece package; "
                            "fix: pip install sentencepiece (or pip install 'megatron-gpt[data]')") from None
        self.path = _require_file(path, "tokenizer.path", "a SentencePiece .model file")
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=self.path)
        except (RuntimeError, OSError) as e:
            raise DataError(f"{self.path}: not a SentencePiece model ({e}); "
                            "fix: point tokenizer.path at a .model file") from None
        self.config = config or TokenizerConfig(type="sentencepiece", path=self.path)
        self._sha256 = file_sha256(self.path)
        self.vocab_size = self._sp.get_piece_size()
        sp = self._sp
        eod = sp.piece_to_id(EOD_TOKEN)
        if eod == sp.unk_id() or sp.id_to_piece(eod) != EOD_TOKEN:
            eod = sp.eos_id()
        if eod < 0:
            raise DataError(f"{self.path}: the model has neither {EOD_TOKEN} nor an eos piece to mark document ends; "
                            f"fix: train it with eos_id >= 0 or user_defined_symbols={EOD_TOKEN}")
        self.eod = eod
        self.pad = sp.pad_id() if sp.pad_id() >= 0 else -1

    @property
    def unique_identifiers(self) -> dict[str, Any]:
        return {"class": "SentencePieceTokenizer", "model_sha256": self._sha256}

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts, out_type=int, num_threads=1)  # preprocessing runs the threads

    def encode_in_thread(self, texts: list[str]) -> list[Sequence[int] | np.ndarray]:
        return self.encode_batch(texts)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._sp.decode(_as_int_list(ids))

    def _compute_byte_lengths(self) -> np.ndarray:
        sp = self._sp
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            if sp.is_control(i) or sp.is_unknown(i):
                continue
            lengths[i] = 1 if sp.is_byte(i) else len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        return lengths


class ByteTokenizer(Tokenizer):
    """Raw UTF-8 bytes: ids 0..255 are bytes, 256 is the EOD. No files, no training."""

    vocab_size = 257
    eod = 256

    def __init__(self) -> None:
        self.config = TokenizerConfig(type="bytes")

    @property
    def unique_identifiers(self) -> dict[str, Any]:
        return {"class": "ByteTokenizer", "vocab_size": self.vocab_size}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_in_thread(self, texts: list[str]) -> list[Sequence[int] | np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return bytes(i for i in _as_int_list(ids) if i < 256).decode("utf-8", errors="replace")

    def _compute_byte_lengths(self) -> np.ndarray:
        lengths = np.ones(self.vocab_size, dtype=np.int64)
        lengths[self.eod] = 0
        return lengths


def build_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    """The tokenizer `cfg` names; missing files raise DataError naming the config key."""
    if cfg.type == "hf":
        return HFTokenizer(cfg.path, cfg)  # type: ignore[arg-type]  # None is reported by _require_file
    if cfg.type == "gpt2bpe":
        return GPT2BPETokenizer(cfg.vocab_file, cfg.merge_file, cfg)  # type: ignore[arg-type]
    if cfg.type == "tiktoken":
        return TiktokenTokenizer(cfg.name, cfg.path, cfg.cache_dir, cfg)
    if cfg.type == "sentencepiece":
        return SentencePieceTokenizer(cfg.path, cfg)
    if cfg.type == "bytes":
        return ByteTokenizer()
    if cfg.type == "embedded":
        if not EMBEDDED_TOKENIZER_PATH.is_file():
            raise DataError(
                f"{EMBEDDED_TOKENIZER_PATH}: the embedded tokenizer asset is missing; "
                "fix: reinstall megatron-gpt or run tools/build_embedded_assets.py"
            )
        return HFTokenizer(str(EMBEDDED_TOKENIZER_PATH), cfg)
    raise DataError(f"tokenizer.type {cfg.type!r} is unknown; fix: use one of {', '.join(TOKENIZER_TYPES)}")
