"""What counts as a secret, wherever a config or a command is shown, saved or sent: a variable
whose name looks secret (the built-in pattern, or launcher.secret_env), or a value holding a URL
with credentials (postgres://user:password@host). Secrets are masked as MASK when shown or saved,
and reach remote ranks only through a file readable by the user alone (launch.run)."""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

import yaml

SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASS|CREDENTIAL|AUTH|PRIVATE|COOKIE", re.IGNORECASE)
"""Environment variable names whose values are masked wherever a config is printed or saved."""
MASK = "***"
URL_CREDENTIALS = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:[^/\s@]+@")
"""scheme://user:password@ in a value: a secret whatever the variable is called."""


def name_matches(name: str, patterns: Iterable[str]) -> bool:
    """`NAME` matches itself; `PREFIX*` matches every name starting with PREFIX."""
    return any(name.startswith(p[:-1]) if p.endswith("*") else name == p for p in patterns)


def is_secret(name: str, value: Any = "", patterns: Iterable[str] = ()) -> bool:
    return bool(SECRET_NAME.search(name) or name_matches(name, patterns)
                or (isinstance(value, str) and URL_CREDENTIALS.search(value)))


def masked_env(env: Mapping[str, str], patterns: Iterable[str] = ()) -> dict[str, str]:
    patterns = tuple(patterns)
    return {k: (MASK if is_secret(k, v, patterns) else v) for k, v in env.items()}


def _override_env(key: str, text: str) -> dict[str, Any]:
    """The environment variables a `--set KEY=VALUE` override sets (launcher.env.NAME=..., the
    mapping form launcher.env={NAME: ...}, or launcher={env: {...}}); {} for any other key."""
    parts = key.strip().split(".")
    if parts[:2] == ["launcher", "env"] and len(parts) == 3:
        return {parts[2]: text}
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if parts == ["launcher"] and isinstance(value, dict):
        value = value.get("env")
    elif parts != ["launcher", "env"]:
        return {}
    return {str(k): v for k, v in value.items()} if isinstance(value, dict) else {}


def override_is_secret(override: str, patterns: Iterable[str] = ()) -> bool:
    """Whether a --set override carries a secret (its name or value, see is_secret)."""
    key, sep, text = override.partition("=")
    if not sep:
        return False
    patterns = tuple(patterns)
    if URL_CREDENTIALS.search(text):
        return True
    return any(is_secret(name, value, patterns) for name, value in _override_env(key, text).items())


def mask_override(override: str, patterns: Iterable[str] = ()) -> str:
    """`launcher.env.WANDB_API_KEY=...` -> `launcher.env.WANDB_API_KEY=***` (any form, see above)."""
    key, sep, _ = override.partition("=")
    return f"{key}{sep}{MASK}" if override_is_secret(override, patterns) else override
