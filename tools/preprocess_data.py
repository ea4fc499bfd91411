"""GPT-NeoX-compatible `preprocess_data.py`: corpora -> megatron-core indexed datasets.

    python tools/preprocess_data.py --input data.jsonl --output-prefix data/mydata \
        --tokenizer-type GPT2BPETokenizer --vocab-file encoder.json --merge-file vocab.bpe \
        --append-eod --workers 2

As in GPT-NeoX, each key K of --jsonl-keys writes OUTPUT_PREFIX_K_document.{bin,idx} and
--append-eod is off unless given. Unlike GPT-NeoX, all keys come from one pass over the inputs
and each dataset holds its own key's text. The same feature is `megatron-gpt preprocess`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import megatron_gpt  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# GPT-NeoX tokenizer names -> ours; our own names are accepted as they are.
NEOX_TOKENIZERS = {"GPT2BPETokenizer": "gpt2bpe", "HFGPT2Tokenizer": "gpt2bpe", "HFTokenizer": "hf",
                   "TiktokenTokenizer": "tiktoken", "SPMTokenizer": "sentencepiece", "CharLevelTokenizer": "bytes"}
OUR_TOKENIZERS = ("embedded", "hf", "gpt2bpe", "tiktoken", "sentencepiece", "bytes")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True,
                   help="input files or globs (.jsonl(.gz/.xz/.zst), .txt, .parquet), space- or comma-separated")
    p.add_argument("--jsonl-keys", nargs="+", default=["text"], help="keys to extract (default: text)")
    p.add_argument("--output-prefix", required=True, help="writes OUTPUT_PREFIX_KEY_document.{bin,idx}")
    p.add_argument("--tokenizer-type", required=True, choices=[*NEOX_TOKENIZERS, *OUR_TOKENIZERS])
    p.add_argument("--vocab-file", help="GPT-2 encoder.json; the tokenizer.json (HFTokenizer); the .model "
                                        "(SPMTokenizer); the encoding name or .tiktoken file (TiktokenTokenizer)")
    p.add_argument("--merge-file", help="GPT-2 vocab.bpe (merges)")
    p.add_argument("--tiktoken-cache-dir", help="tiktoken cache directory (default: $TIKTOKEN_CACHE_DIR)")
    p.add_argument("--append-eod", action="store_true", help="append <|endoftext|> after every document")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument("--dataset-impl", choices=["mmap"], default="mmap", help="accepted for GPT-NeoX scripts; always mmap")
    p.add_argument("--log-interval", type=int, help="accepted for GPT-NeoX scripts; a progress line is shown instead")
    args = p.parse_args(argv)
    args.input = [f for arg in args.input for f in arg.split(",") if f]
    return args


def tokenizer_config(args: argparse.Namespace):  # -> TokenizerConfig
    from megatron_gpt.config.schema import TokenizerConfig

    kind = NEOX_TOKENIZERS.get(args.tokenizer_type, args.tokenizer_type)
    vocab = args.vocab_file
    if kind == "gpt2bpe":
        return TokenizerConfig(type=kind, vocab_file=vocab, merge_file=args.merge_file)
    if kind in ("hf", "sentencepiece"):
        return TokenizerConfig(type=kind, path=vocab)
    if kind == "tiktoken":  # GPT-NeoX passes the encoding name as --vocab-file; a .tiktoken file names it too
        is_file = bool(vocab) and vocab.endswith(".tiktoken")
        name = Path(vocab).name.removesuffix(".tiktoken") if is_file else vocab
        return TokenizerConfig(type=kind, name=name, path=vocab if is_file else None, cache_dir=args.tiktoken_cache_dir)
    return TokenizerConfig(type=kind)


def main(argv: list[str] | None = None) -> int:
    from megatron_gpt.cli.data import output_prefixes, run_preprocessing
    from megatron_gpt.data.errors import DataError
    from megatron_gpt.data.tokenizer import build_tokenizer

    args = parse_args(argv)
    try:
        tokenizer = build_tokenizer(tokenizer_config(args))
        outputs = output_prefixes(args.output_prefix, args.jsonl_keys, neox_names=True)
        run_preprocessing(args.input, outputs, tokenizer, args.append_eod, args.workers, not args.quiet)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
