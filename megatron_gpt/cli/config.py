"""`megatron-gpt config show|deepspeed`: argument parsing; the printing lives in config.show."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from megatron_gpt.cli.guard import expected
from megatron_gpt.config.deepspeed import deepspeed_config
from megatron_gpt.config.loader import ConfigError, load_config_with_origins
from megatron_gpt.config.show import header, to_yaml


def register(subparsers: Any) -> None:
    """Add the `config` command to the CLI's subparsers."""
    parser = subparsers.add_parser(
        "config", help="show the resolved config, or the DeepSpeed JSON derived from it",
        description="Merge YAML files (later wins) and --set overrides, validate, and print the result.")
    parser.set_defaults(func=lambda args: _usage(parser))
    sub = parser.add_subparsers(dest="config_command", metavar="{show,deepspeed}")

    show = sub.add_parser("show", help="print the resolved config as YAML")
    _add_common(show)
    show.add_argument("--doc", action="store_true",
                      help="add each field's description (and the file/line that set it) as comments")
    show.set_defaults(func=_show)

    ds = sub.add_parser("deepspeed", help="print the DeepSpeed config JSON")
    _add_common(ds)
    ds.set_defaults(func=_deepspeed)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE", help="YAML config files, merged in order")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key, value parsed as YAML (e.g. training.train_steps=5); repeatable")
    parser.add_argument("--world-size", type=int, default=None, metavar="N",
                        help="check against N ranks instead of launcher.nproc_per_node x launcher.num_nodes")


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


@expected(ConfigError)
def _show(args: argparse.Namespace) -> int:
    cfg, origins = load_config_with_origins(args.files, args.overrides, args.world_size)
    text = header(cfg, args.files, args.overrides, args.world_size)
    sys.stdout.write(text + to_yaml(cfg, doc=args.doc, origins=origins if args.doc else None))
    return 0


@expected(ConfigError)
def _deepspeed(args: argparse.Namespace) -> int:
    cfg, _ = load_config_with_origins(args.files, args.overrides, args.world_size)
    print(json.dumps(deepspeed_config(cfg, args.world_size), indent=2))
    return 0


