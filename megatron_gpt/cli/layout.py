"""`megatron-gpt layout CONFIG...`: argument parsing; the table is training.layout_report's."""

from __future__ import annotations

import argparse
import sys


def _layout(args: argparse.Namespace) -> int:
    from megatron_gpt.config import ConfigError, load_config, padded_vocab_size
    from megatron_gpt.training.layout_report import layout_report

    try:
        cfg = load_config(args.configs, args.overrides, world_size=args.world_size)
        vocab = args.vocab_size
        if vocab is None:
            from megatron_gpt.data.tokenizer import build_tokenizer

            vocab = build_tokenizer(cfg.tokenizer).vocab_size
        world = args.world_size or cfg.world_size
        print(layout_report(cfg, world, padded_vocab_size(vocab, cfg), args.gpu_memory)[0])
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def _size(text: str) -> int:
    from megatron_gpt.training.memory_plan import parse_size

    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def register(subparsers) -> None:
    parser = subparsers.add_parser("layout", help="print each rank's coordinates, layers, parameters and memory")
    parser.add_argument("configs", nargs="+", help="YAML files, merged in order")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--world-size", type=int, default=None, help="ranks (default: launcher nodes x procs)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="tokenizer vocabulary (default: read from the config's tokenizer)")
    parser.add_argument("--gpu-memory", type=_size, default="80GB", metavar="SIZE",
                        help="memory of one GPU for the verdict, e.g. 80GB, 40GiB, 141GB (default: 80GB)")
    parser.set_defaults(func=_layout)
