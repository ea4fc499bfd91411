"""`megatron-gpt` command line: argument parsing only, one module per command group. Each module
registers its subcommands and calls domain code with typed arguments; heavy imports (torch,
DeepSpeed, megatron-core) happen inside the handlers, so `--help` and light commands start fast."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from megatron_gpt import __version__
    from megatron_gpt.cli import config, convert, data, generate, layout, sft, slurm, train
    from megatron_gpt.cli import eval as eval_command

    parser = argparse.ArgumentParser(prog="megatron-gpt", description="Distributed GPT training from YAML configs.")
    parser.add_argument("--version", action="version", version=f"megatron-gpt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (train, config, data, sft, eval_command, slurm, layout, generate, convert):
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
