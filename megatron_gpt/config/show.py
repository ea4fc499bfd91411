"""What `megatron-gpt config show` prints: the resolved config as YAML, optionally with each
field's description and the file/line that set it, under a header naming the sources and the
derived layout."""

from __future__ import annotations

from typing import Mapping, Sequence

import yaml
from pydantic import BaseModel

from .derive import batch_layout
from .loader import DEFAULT, config_to_dict
from .schema import Config
from .secrets import mask_override


def masked(override: str, patterns=()) -> str:
    """`--set launcher.env.WANDB_API_KEY=...` (or the mapping form) is echoed without its value."""
    return mask_override(override, patterns)


def header(cfg: Config, files: Sequence[str], overrides: Sequence[str], world_size: int | None) -> str:
    sources = [*files, *(f"--set {masked(o, cfg.launcher.secret_env)}" for o in overrides)]
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
        is_section = isinstance(getattr(cfg, name), BaseModel)
        out += _comment(field.description, None if is_section else (origins or {}).get(name), "")
        if is_section:
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
