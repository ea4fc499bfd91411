"""The `preprocess`, `train-tokenizer` and `data inspect|merge` subcommands of the megatron-gpt CLI.

Heavy libraries (torch, megatron-core, tokenizers) are imported inside the handlers so that
`megatron-gpt --help` and every other subcommand start fast.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from megatron_gpt.cli.guard import expected
from megatron_gpt.data.errors import DataError

# Kept in step with tokenizer.TOKENIZER_TYPES (a test checks), not imported: that module is heavy.
TOKENIZER_TYPES = ("embedded", "hf", "gpt2bpe", "tiktoken", "sentencepiece", "bytes")


def add_tokenizer_args(p: argparse.ArgumentParser, default: str | None = "embedded") -> None:
    g = p.add_argument_group("tokenizer (all offline)")
    g.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=default,
                   help="embedded: the bundled Shakespeare BPE; hf: a tokenizer.json; gpt2bpe: encoder.json + "
                        "vocab.bpe; tiktoken: an encoding by --tokenizer-name; sentencepiece: a .model; "
                        "bytes: raw UTF-8 bytes")
    g.add_argument("--tokenizer-path", help="hf: tokenizer.json; sentencepiece: .model; tiktoken: the .tiktoken "
                                            "file or a directory holding it")
    g.add_argument("--vocab-file", help="GPT-2 encoder.json (gpt2bpe)")
    g.add_argument("--merge-file", help="GPT-2 vocab.bpe (gpt2bpe)")
    g.add_argument("--tokenizer-name", help="tiktoken encoding name, e.g. cl100k_base, o200k_base, gpt2")
    g.add_argument("--tokenizer-cache-dir", help="tiktoken cache directory (default: $TIKTOKEN_CACHE_DIR)")


def tokenizer_config_from_args(args: argparse.Namespace) -> Any:  # -> TokenizerConfig
    from megatron_gpt.config.schema import TokenizerConfig

    return TokenizerConfig(type=args.tokenizer_type, path=args.tokenizer_path, vocab_file=args.vocab_file,
                           merge_file=args.merge_file, name=args.tokenizer_name, cache_dir=args.tokenizer_cache_dir)


def tokenizer_from_args(args: argparse.Namespace) -> Any:  # -> Tokenizer (lazy import keeps start-up fast)
    from megatron_gpt.data.tokenizer import build_tokenizer

    return build_tokenizer(tokenizer_config_from_args(args))


def output_prefixes(output_prefix: str, keys: list[str], neox_names: bool = False) -> dict[str, str]:
    """One key: PREFIX itself; several: PREFIX_KEY. GPT-NeoX's names: always PREFIX_KEY_document."""
    if len(set(keys)) != len(keys):
        raise DataError(f"keys {keys} repeat one; fix: name each key once")
    if neox_names:
        return {k: f"{output_prefix}_{k}_document" for k in keys}
    return {keys[0]: output_prefix} if len(keys) == 1 else {k: f"{output_prefix}_{k}" for k in keys}


def run_preprocessing(inputs: list[str], outputs: dict[str, str], tokenizer: Any, append_eod: bool, workers: int,
                      progress: bool, allow_empty: bool = False) -> None:
    """Preprocess and print one summary line per output (shared with tools/preprocess_data.py)."""
    from megatron_gpt.data.preprocess import preprocess_keys

    stats = preprocess_keys(inputs, outputs, tokenizer, append_eod=append_eod, workers=workers, progress=progress,
                            allow_empty=allow_empty)
    for key, prefix in outputs.items():
        print(f"{prefix}.{{bin,idx}} ({key!r}): {stats[key].summary()}")


@expected(DataError)
def run_preprocess(args: argparse.Namespace) -> int:
    """Tokenize corpora (.jsonl/.gz/.xz/.zst, .txt, .parquet; files or globs) into PREFIX.bin/.idx."""
    tokenizer = tokenizer_from_args(args)
    outputs = output_prefixes(args.output_prefix, args.json_keys)
    run_preprocessing(args.input, outputs, tokenizer, args.append_eod, args.workers, not args.quiet, args.allow_empty)
    return 0


@expected(DataError)
def run_train_tokenizer(args: argparse.Namespace) -> int:
    """Train a byte-level BPE tokenizer.json."""
    from megatron_gpt.data.train_tokenizer import train_tokenizer

    start = time.perf_counter()
    train_tokenizer(args.input, args.output, args.vocab_size, json_key=args.json_key)
    mb = sum(os.path.getsize(p) for p in args.input) / 1e6
    print(f"{args.output}: byte-level BPE, vocab {args.vocab_size}, from {len(args.input)} file(s), "
          f"{mb:.1f} MB on disk, {time.perf_counter() - start:.1f} s")
    return 0


@expected(DataError)
def run_inspect(args: argparse.Namespace) -> int:
    """Documents, tokens, dtype and a decoded sample of an indexed dataset."""
    from megatron_gpt.data.describe import describe

    print(describe(args.prefix, args.document, args.tokens,
                   tokenizer_config_from_args(args) if args.tokenizer_type else None))
    return 0


@expected(DataError)
def run_merge(args: argparse.Namespace) -> int:
    """Concatenate indexed datasets into OUT (document boundaries kept)."""
    from megatron_gpt.data.indexed import merge

    start = time.perf_counter()
    merged = merge(args.output, args.prefixes)
    print(f"{args.output}.{{bin,idx}}: {merged.documents:,} documents, {merged.tokens:,} tokens ({merged.dtype}) "
          f"from {len(args.prefixes)} datasets, {time.perf_counter() - start:.1f} s")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `preprocess`, `train-tokenizer` and `data`; each sets func(args) -> exit code."""
    p = subparsers.add_parser("preprocess", help="tokenize corpora into indexed datasets (.bin/.idx)",
                              description=run_preprocess.__doc__)
    p.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="input files or glob patterns (quote them; ** recurses): .jsonl(.gz/.xz/.zst) with one "
                        "JSON document per line, .txt (one document per file), .parquet")
    p.add_argument("--output-prefix", required=True,
                   help="writes PREFIX.bin/.idx (several keys: PREFIX_KEY.bin/.idx) and PREFIX.meta.json")
    p.add_argument("--json-keys", "--json-key", nargs="+", default=["text"], metavar="KEY",
                   help="keys (parquet: columns) of the text; one dataset per key (default: text)")
    p.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                   help="append the end-of-document token after every document (default: on)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="tokenizer processes, forked after the tokenizer loads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument("--allow-empty", action="store_true",
                   help="write an empty dataset when the inputs hold no document (default: an error)")
    add_tokenizer_args(p)
    p.set_defaults(func=run_preprocess)

    t = subparsers.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer.json on JSONL",
                              description=run_train_tokenizer.__doc__)
    t.add_argument("--input", nargs="+", required=True, metavar="FILE", help="input .jsonl / .jsonl.gz / .jsonl.xz files")
    t.add_argument("--output", required=True, help="tokenizer.json to write")
    t.add_argument("--vocab-size", type=int, default=2048, help="vocabulary size incl. <|endoftext|> (default: 2048)")
    t.add_argument("--json-key", default="text", help="key of the document text (default: text)")
    t.set_defaults(func=run_train_tokenizer)

    d = subparsers.add_parser("data", help="inspect or merge indexed datasets")
    sub = d.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    i = sub.add_parser("inspect", help=run_inspect.__doc__, description=run_inspect.__doc__)
    i.add_argument("prefix", metavar="PREFIX", help="dataset prefix (PREFIX.bin/.idx)")
    i.add_argument("--document", type=int, default=0, help="which document to decode (default: 0)")
    i.add_argument("--tokens", type=int, default=64, help="how many of its tokens to show (default: 64)")
    add_tokenizer_args(i, default=None)
    i.set_defaults(func=run_inspect)
    m = sub.add_parser("merge", help=run_merge.__doc__, description=run_merge.__doc__)
    m.add_argument("output", metavar="OUT", help="output prefix")
    m.add_argument("prefixes", nargs="+", metavar="PREFIX", help="input prefixes, concatenated in this order")
    m.set_defaults(func=run_merge)
