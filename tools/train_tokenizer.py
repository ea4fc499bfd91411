"""Train a byte-level BPE tokenizer.json on JSONL (GPT-NeoX `train_tokenizer.py` flags accepted).

    python tools/train_tokenizer.py --input data.jsonl --output tokenizer.json --vocab-size 8192
    python tools/train_tokenizer.py --json_input_dir data/ --tokenizer_output_path tok/ --vocab_size 8192

The same feature is `megatron-gpt train-tokenizer`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

try:
    import megatron_gpt  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_gpt.data.errors import DataError  # noqa: E402
from megatron_gpt.data.reader import SUFFIXES  # noqa: E402
from megatron_gpt.data.train_tokenizer import train_tokenizer  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", help="input .jsonl(.gz/.xz) files")
    src.add_argument("--json_input_dir", help="GPT-NeoX: a folder; every .jsonl(.gz/.xz) in it is used")
    dst = p.add_mutually_exclusive_group(required=True)
    dst.add_argument("--output", help="tokenizer.json to write")
    dst.add_argument("--tokenizer_output_path", help="GPT-NeoX: a .json file, or a folder to hold tokenizer.json")
    p.add_argument("--vocab-size", "--vocab_size", "-v", dest="vocab_size", type=int, default=2048)
    p.add_argument("--json-key", "--jsonl-keys", dest="json_key", default="text", help="key of the text (default: text)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    inputs = args.input
    if args.json_input_dir:
        if not os.path.isdir(args.json_input_dir):
            print(f"error: {args.json_input_dir}: not a folder; fix: pass the folder holding the .jsonl files", file=sys.stderr)
            return 2
        inputs = sorted(str(f) for f in Path(args.json_input_dir).iterdir() if f.name.endswith(SUFFIXES))
    output = args.output or args.tokenizer_output_path
    if not output.endswith(".json"):
        output = os.path.join(output, "tokenizer.json")
    try:
        train_tokenizer(inputs, output, args.vocab_size, json_key=args.json_key)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{output}: byte-level BPE, vocab {args.vocab_size}, trained on {len(inputs)} file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
