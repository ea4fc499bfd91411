"""Per-rank entry point that launchers start: `python -m megatron_gpt.training.main CONFIG... --set K=V`."""

from __future__ import annotations

import argparse
import os
import sys
import warnings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="megatron_gpt.training.main")
    parser.add_argument("configs", nargs="+", help="YAML files, merged in order")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", module="megatron")  # import-time notices about optional deps
    from megatron_gpt.config import ConfigError, load_config

    try:
        cfg = load_config(args.configs, args.overrides, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from megatron_gpt.data.errors import DataError
    from megatron_gpt.distributed import shutdown
    from megatron_gpt.training.loop import train

    try:
        train(cfg)
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
