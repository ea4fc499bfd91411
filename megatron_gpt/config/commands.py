"""`megatron-gpt config show|deepspeed`: print the resolved config or its DeepSpeed JSON."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Mapping, Sequence

import yaml

from .deepspeed import deepspeed_config
from .derive import batch_layout
from .loader import DEFAULT, ConfigError, config_to_dict, load_config_with_origins
from .schema import MASK, SECRET_NAME, Config


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
    show.set_defaults(func=_guarded(_show))

    ds = sub.add_parser("deepspeed", help="print the DeepSpeed config JSON")
    _add_common(ds)
    ds.set_defaults(func=_guarded(_deepspeed))


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE", help="YAML config files, merged in order")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key, value parsed as YAML (e.g. training.train_steps=5); repeatable")
    parser.add_argument("--world-size", type=int, default=None, metavar="N",
                        help="check against N ranks instead of launcher.nproc_per_node x launcher.num_nodes")


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _guarded(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return run


def _show(args: argparse.Namespace) -> int:
    cfg, origins = load_config_with_origins(args.files, args.overrides, args.world_size)
    header = _header(cfg, args.files, args.overrides, args.world_size)
    sys.stdout.write(header + to_yaml(cfg, doc=args.doc, origins=origins if args.doc else None))
    return 0


def _deepspeed(args: argparse.Namespace) -> int:
    cfg, _ = load_config_with_origins(args.files, args.overrides, args.world_size)
    print(json.dumps(deepspeed_config(cfg, args.world_size), indent=2))
    return 0


def _masked(override: str) -> str:
    """`--set launcher.env.WANDB_API_KEY=...` is echoed without its value."""
    key, sep, _ = override.partition("=")
    return f"{key}{sep}{MASK}" if sep and SECRET_NAME.search(key.rsplit(".", 1)[-1]) else override


def _header(cfg: Config, files: Sequence[str], overrides: Sequence[str], world_size: int | None) -> str:
    sources = [*files, *(f"--set {_masked(o)}" for o in overrides)]
    b = batch_layout(cfg, world_size)
    lines = [
        "resolved from: " + ", ".join(sources),
        f"world size {b.world_size} = tensor {b.tensor} x pipeline {b.pipeline} x data-parallel {b.data_parallel}",
        f"global batch {b.global_batch_size} = micro {b.micro_batch_size} x grad-accum "
        f"{b.gradient_accumulation_steps} x data-parallel {b.data_parallel}",
    ]
    return "".join("# " + line.replace("\n", "\\n") + "\n" for line in lines) + "\n"


def to_yaml(cfg: Config, doc: bool = False, origins: Mapping[str, str] | None = None) -> str:
    """The config as YAML in schema order; ``doc`` adds field descriptions as comments."""
    data = config_to_dict(cfg)
    if not doc:
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    out: list[str] = []
    for name, field in Config.model_fields.items():
        value = data[name]
        out += _comment(field.description, None if isinstance(value, dict) else (origins or {}).get(name), "")
        if isinstance(value, dict):
            section = getattr(cfg, name)
            out.append(f"{name}:\n")
            for key, sub in type(section).model_fields.items():
                out += _comment(sub.description, (origins or {}).get(f"{name}.{key}"), "  ")
                # Dump under the section so PyYAML indents multi-line scalars itself.
                dumped = yaml.safe_dump({name: {key: value[key]}}, sort_keys=False, allow_unicode=True)
                out.append(dumped.split("\n", 1)[1])
        else:
            out.append(yaml.safe_dump({name: value}, sort_keys=False, allow_unicode=True))
        out.append("\n")
    return "".join(out)


def _comment(description: str | None, origin: str | None, indent: str) -> list[str]:
    lines = [line.strip() for line in (description or "").strip().splitlines()] or [""]
    if origin and origin != DEFAULT:
        lines[-1] += f"  [set by {origin}]"
    return [f"{indent}# {line}\n" for line in lines if line]
