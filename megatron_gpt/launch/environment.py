"""Which environment variables reach every rank, and how secrets are kept out of printed output."""

from __future__ import annotations

import re
import shlex
from typing import Iterable, Mapping

from megatron_gpt.config.schema import MASK, SECRET_NAME, LauncherConfig

def is_secret(name: str) -> bool:
    return bool(SECRET_NAME.search(name))


def matches(name: str, patterns: Iterable[str]) -> bool:
    """`NAME` matches itself; `PREFIX*` matches every name starting with PREFIX."""
    return any(name.startswith(p[:-1]) if p.endswith("*") else name == p for p in patterns)


def forwarded(launcher: LauncherConfig, environ: Mapping[str, str]) -> dict[str, str]:
    """Variables every rank gets: launcher.forward_env taken from `environ`, then launcher.env."""
    out = {name: value for name, value in sorted(environ.items()) if matches(name, launcher.forward_env)}
    out.update(launcher.env)
    return out


def masked(env: Mapping[str, str]) -> dict[str, str]:
    return {k: (MASK if is_secret(k) else v) for k, v in env.items()}


_SET_ENV = re.compile(r"^(launcher\.env\.([A-Za-z_][A-Za-z0-9_]*))=(.*)$", re.DOTALL)


def mask_argument(argument: str) -> str:
    """`launcher.env.WANDB_API_KEY=...` (a --set value) -> `launcher.env.WANDB_API_KEY=***`; also
    `NAME=value` words (env assignments, mpirun -x, export) whose name looks secret."""
    match = _SET_ENV.match(argument)
    if match and is_secret(match.group(2)):
        return f"{match.group(1)}={MASK}"
    name, sep, _ = argument.partition("=")
    if sep and re.fullmatch(r"(export )?[A-Za-z_][A-Za-z0-9_]*", name) and is_secret(name.split()[-1]):
        return f"{name}={MASK}"
    return argument


def printable(command: list[str], env: Mapping[str, str] | None = None) -> str:
    """One shell line, `K=V ... command`, with secret values masked."""
    words = [f"{k}={shlex.quote(v)}" for k, v in masked(env or {}).items()]
    return " ".join(words + [shlex.quote(mask_argument(word)) for word in command])

