"""`megatron-gpt train CONFIG...`: argument parsing; launch.run starts the ranks."""

from __future__ import annotations

import argparse
import sys


def _train(args: argparse.Namespace) -> int:
    from megatron_gpt.config import ConfigError, load_config
    from megatron_gpt.launch.run import launch

    try:
        cfg = load_config(args.configs, args.overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return launch(cfg, args.configs, args.overrides, dry_run=args.dry_run)


def register(subparsers) -> None:
    train = subparsers.add_parser("train", help="train on the ranks the config's launcher section asks for")
    train.add_argument("configs", nargs="+", help="YAML files, merged in order (later wins)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one key, e.g. --set training.train_steps=100 (value parsed as YAML)")
    train.add_argument("--dry-run", action="store_true",
                       help="print the command for this host and for every node, and start nothing")
    train.set_defaults(func=_train)
