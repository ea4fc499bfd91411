"""`megatron-gpt` command line: one subcommand per job; each feature's module registers its own."""

from __future__ import annotations

import argparse
import sys


def _train(args: argparse.Namespace) -> int:
    from megatron_gpt.config import ConfigError, load_config
    from megatron_gpt.launcher import launch

    try:
        cfg = load_config(args.configs, args.overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return launch(cfg, args.configs, args.overrides, dry_run=args.dry_run)


def build_parser() -> argparse.ArgumentParser:
    from megatron_gpt import __version__, generate_command, layout
    from megatron_gpt.config import commands as config_commands
    from megatron_gpt.convert import commands as convert_commands
    from megatron_gpt.data import commands as data_commands
    from megatron_gpt import evaluation
    from megatron_gpt.launch import slurm

    parser = argparse.ArgumentParser(prog="megatron-gpt", description="Distributed GPT training from YAML configs.")
    parser.add_argument("--version", action="version", version=f"megatron-gpt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = sub.add_parser("train", help="train on the ranks the config's launcher section asks for")
    train.add_argument("configs", nargs="+", help="YAML files, merged in order (later wins)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one key, e.g. --set training.train_steps=100 (value parsed as YAML)")
    train.add_argument("--dry-run", action="store_true",
                       help="print the command for this host and for every node, and start nothing")
    train.set_defaults(func=_train)
    config_commands.register(sub)
    data_commands.register(sub)
    evaluation.register(sub)
    slurm.register(sub)
    layout.register(sub)
    generate_command.register(sub)
    convert_commands.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
