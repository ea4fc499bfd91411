"""GPT-NeoX-compatible `preprocess_data.py`: JSONL -> megatron-core indexed datasets.

    python tools/preprocess_data.py --input data.jsonl --output-prefix data/mydata \
        --tokenizer-type GPT2BPETokenizer --vocab-file encoder.json --merge-file vocab.bpe \
        --append-eod --workers 2

As in GPT-NeoX, each key K of --jsonl-keys writes OUTPUT_PREFIX_K_document.{bin,idx} and
--append-eod is off unless given. The same feature is `megatron-gpt preprocess`.
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
NEOX_TOKENIZERS = {"GPT2BPETokenizer": "gpt2bpe", "HFGPT2Tokenizer": "gpt2bpe", "HFTokenizer": "hf"}
OUR_TOKENIZERS = ("embedded", "hf", "gpt2bpe", "bytes")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True,
                   help="input .jsonl(.gz/.xz) files, space- or comma-separated (GPT-NeoX uses commas)")
    p.add_argument("--jsonl-keys", nargs="+", default=["text"], help="keys to extract (default: text)")
    p.add_argument("--output-prefix", required=True, help="writes OUTPUT_PREFIX_KEY_document.{bin,idx}")
    p.add_argument("--tokenizer-type", required=True, choices=[*NEOX_TOKENIZERS, *OUR_TOKENIZERS])
    p.add_argument("--vocab-file", help="GPT-2 encoder.json, or the tokenizer.json for HFTokenizer")
    p.add_argument("--merge-file", help="GPT-2 vocab.bpe (merges)")
    p.add_argument("--append-eod", action="store_true", help="append <|endoftext|> after every document")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--dataset-impl", choices=["mmap"], default="mmap", help="accepted for GPT-NeoX scripts; always mmap")
    p.add_argument("--log-interval", type=int, help="accepted for GPT-NeoX scripts; a progress bar is shown instead")
    args = p.parse_args(argv)
    args.input = [f for arg in args.input for f in arg.split(",") if f]
    return args


def main(argv: list[str] | None = None) -> int:
    from megatron_gpt.config.schema import TokenizerConfig
    from megatron_gpt.data.errors import DataError
    from megatron_gpt.data.preprocess import preprocess
    from megatron_gpt.data.tokenizer import build_tokenizer

    args = parse_args(argv)
    kind = NEOX_TOKENIZERS.get(args.tokenizer_type, args.tokenizer_type)
    try:
        cfg = TokenizerConfig(
            type=kind,
            path=args.vocab_file if kind == "hf" else None,
            vocab_file=args.vocab_file if kind == "gpt2bpe" else None,
            merge_file=args.merge_file if kind == "gpt2bpe" else None,
        )
        tokenizer = build_tokenizer(cfg)
        for key in args.jsonl_keys:
            prefix = f"{args.output_prefix}_{key}_document"
            stats = preprocess(args.input, prefix, tokenizer, json_key=key,
                               append_eod=args.append_eod, workers=args.workers)
            print(f"{prefix}.{{bin,idx}}: {stats.summary()}")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
