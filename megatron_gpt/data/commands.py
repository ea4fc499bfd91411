"""The `preprocess` and `train-tokenizer` subcommands of the megatron-gpt CLI.

Heavy libraries (torch, megatron-core, tokenizers) are imported inside the handlers so that
`megatron-gpt --help` and every other subcommand start fast.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

TOKENIZER_TYPES = ("embedded", "hf", "gpt2bpe", "bytes")


def add_tokenizer_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default="embedded",
                   help="embedded: the bundled Shakespeare BPE; hf: a tokenizer.json; "
                        "gpt2bpe: encoder.json + vocab.bpe via tiktoken; bytes: raw UTF-8 bytes")
    g.add_argument("--tokenizer-path", help="HF tokenizer.json (--tokenizer-type hf)")
    g.add_argument("--vocab-file", help="GPT-2 encoder.json (--tokenizer-type gpt2bpe)")
    g.add_argument("--merge-file", help="GPT-2 vocab.bpe (--tokenizer-type gpt2bpe)")


def tokenizer_from_args(args: argparse.Namespace):  # -> Tokenizer (lazy import keeps start-up fast)
    from megatron_gpt.config.schema import TokenizerConfig
    from megatron_gpt.data.tokenizer import build_tokenizer

    cfg = TokenizerConfig(type=args.tokenizer_type, path=args.tokenizer_path,
                          vocab_file=args.vocab_file, merge_file=args.merge_file)
    return build_tokenizer(cfg)


def _guarded(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn a DataError into `error: ...` on stderr and exit code 2 (no traceback)."""

    def run(args: argparse.Namespace) -> int:
        from megatron_gpt.data.errors import DataError

        try:
            return handler(args)
        except DataError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    run.__name__ = handler.__name__
    run.__doc__ = handler.__doc__
    return run


@_guarded
def run_preprocess(args: argparse.Namespace) -> int:
    """Tokenize JSONL files into PREFIX.bin/.idx."""
    from megatron_gpt.data.preprocess import preprocess

    tokenizer = tokenizer_from_args(args)
    stats = preprocess(args.input, args.output_prefix, tokenizer, json_key=args.json_key,
                       append_eod=args.append_eod, workers=args.workers, progress=not args.quiet)
    print(f"{args.output_prefix}.{{bin,idx}}: {stats.summary()}")
    return 0


@_guarded
def run_train_tokenizer(args: argparse.Namespace) -> int:
    """Train a byte-level BPE tokenizer.json."""
    import os

    from megatron_gpt.data.train_tokenizer import train_tokenizer

    start = time.perf_counter()
    train_tokenizer(args.input, args.output, args.vocab_size, json_key=args.json_key)
    mb = sum(os.path.getsize(p) for p in args.input) / 1e6
    print(f"{args.output}: byte-level BPE, vocab {args.vocab_size}, from {len(args.input)} file(s), "
          f"{mb:.1f} MB on disk, {time.perf_counter() - start:.1f} s")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `preprocess` and `train-tokenizer`; each sets func(args) -> exit code."""
    p = subparsers.add_parser("preprocess", help="tokenize JSONL corpora into indexed datasets (.bin/.idx)",
                              description=run_preprocess.__doc__)
    p.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="input .jsonl / .jsonl.gz / .jsonl.xz files, one JSON document per line")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--json-key", default="text", help="key of the document text (default: text)")
    p.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                   help="append the end-of-document token after every document (default: on)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_tokenizer_args(p)
    p.set_defaults(func=run_preprocess)

    t = subparsers.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer.json on JSONL",
                              description=run_train_tokenizer.__doc__)
    t.add_argument("--input", nargs="+", required=True, metavar="FILE", help="input .jsonl / .jsonl.gz / .jsonl.xz files")
    t.add_argument("--output", required=True, help="tokenizer.json to write")
    t.add_argument("--vocab-size", type=int, default=2048, help="vocabulary size incl. <|endoftext|> (default: 2048)")
    t.add_argument("--json-key", default="text", help="key of the document text (default: text)")
    t.set_defaults(func=run_train_tokenizer)
