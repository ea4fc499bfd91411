"""Export a checkpoint (any tensor/pipeline/data layout, any ZeRO stage) as a Hugging Face model.

    python tools/convert_to_hf.py checkpoints/run hf/run --arch llama --dtype bf16
    python tools/convert_to_hf.py --input_dir checkpoints/run/global_step1000 --output_dir hf/run \\
        --architecture neox --precision fp16              # GPT-NeoX's convert_neox_to_hf.py flags

The same feature is `megatron-gpt export-hf`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import megatron_gpt  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_gpt.cli import convert as commands  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("positional", nargs="*", metavar="CHECKPOINT OUT", help="checkpoint and output folder")
    p.add_argument("--input_dir", "--input-dir", default=None, help="GPT-NeoX: the checkpoint (save_dir or global_step*)")
    p.add_argument("--output_dir", "--output-dir", default=None, help="GPT-NeoX: the HF folder to write")
    p.add_argument("--config_file", default=None, help="GPT-NeoX: ignored (the config is read from the checkpoint)")
    p.add_argument("--arch", "--architecture", dest="arch", choices=["neox", "llama", "gpt2"], default=None)
    p.add_argument("--dtype", "--precision", dest="dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--tag", default=None)
    p.add_argument("--max-shard-size", "--max_shard_size", dest="max_shard_size", default="5GB")
    p.add_argument("--vocab-size", "--vocab_size", dest="vocab_size", type=int, default=None)
    p.add_argument("--no-tokenizer", dest="no_tokenizer", action="store_true")
    p.add_argument("--tokenizer", default=None, help="tokenizer file to use instead of the copy in the checkpoint")
    args = p.parse_args(argv)
    rest = list(args.positional)
    args.checkpoint = args.input_dir or (rest.pop(0) if rest else None)
    args.out = args.output_dir or (rest.pop(0) if rest else None)
    if args.checkpoint is None or args.out is None or rest:
        p.error("give CHECKPOINT and OUT (or --input_dir and --output_dir)")
    return args


def main(argv: list[str] | None = None) -> int:
    return commands.run_export(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
