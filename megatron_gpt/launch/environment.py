"""Which environment variables reach every rank, which values may travel on a command line, and
how secrets are kept out of printed output (what is a secret: config.secrets)."""

from __future__ import annotations

import re
import shlex
from typing import Iterable, Mapping

from megatron_gpt.config.schema import LauncherConfig
from megatron_gpt.config.secrets import MASK, is_secret, mask_override, masked_env, name_matches

__all__ = ["MASK", "is_secret", "matches", "forwarded", "masked", "mask_argument", "printable", "plain_word",
           "check_host"]

matches = name_matches

_PLAIN = re.compile(r"[\w@%+=:,./-]*")
"""Characters that every shell, DeepSpeed's `"..."` wrapping (multinode_runner.add_export) and
pdsh's word splitting leave alone: a value made of them travels verbatim on any command line."""
_HOST = re.compile(r"[A-Za-z0-9_\[\]][A-Za-z0-9_.:\[\]-]*")


def plain_word(value: str) -> bool:
    return bool(value) and _PLAIN.fullmatch(value) is not None


def check_host(host: str, where: str) -> str:
    """A host name or address that no ssh, pdsh or shell can take for an option or a command."""
    if not _HOST.fullmatch(host or ""):
        raise ValueError(f"{where}: {host!r} is not a host name or address (letters, digits, . - _ : [ ] only, "
                         "not starting with '-'); fix: write the node's name or IP address")
    return host


def forwarded(launcher: LauncherConfig, environ: Mapping[str, str]) -> dict[str, str]:
    """Variables every rank gets: launcher.forward_env taken from `environ`, then launcher.env."""
    out = {name: value for name, value in sorted(environ.items()) if matches(name, launcher.forward_env)}
    out.update(launcher.env)
    return out


def masked(env: Mapping[str, str], patterns: Iterable[str] = ()) -> dict[str, str]:
    return masked_env(env, patterns)


def mask_argument(argument: str, patterns: Iterable[str] = ()) -> str:
    """A --set override carrying a secret -> `KEY=***`; also `NAME=value` words (env assignments,
    mpirun -x, export) whose name or value looks secret."""
    masked_override = mask_override(argument, patterns)
    if masked_override != argument:
        return masked_override
    name, sep, value = argument.partition("=")
    if sep and re.fullmatch(r"(export )?[A-Za-z_][A-Za-z0-9_]*", name) and is_secret(name.split()[-1], value, patterns):
        return f"{name}={MASK}"
    return argument


def printable(command: list[str], env: Mapping[str, str] | None = None, patterns: Iterable[str] = ()) -> str:
    """One shell line, `K=V ... command`, with secret values masked."""
    words = [f"{k}={shlex.quote(v)}" for k, v in masked(env or {}, patterns).items()]
    return " ".join(words + [shlex.quote(mask_argument(word, patterns)) for word in command])
