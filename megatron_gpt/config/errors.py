"""Config errors: each problem carries where the bad value was set (file:line, --set, default)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import yaml

Origins = dict[str, str]
"""Dotted key -> where it was set last: ``"file.yml:12"``, ``"--set"`` or ``"default"``."""

DEFAULT = "default"
SET = "--set"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the config; ``origin`` is None when it is not known."""

    origin: str | None
    text: str

    def __str__(self) -> str:
        return f"{self.origin}: {self.text}" if self.origin else self.text


class ConfigError(ValueError):
    """A config problem, with the file (and line), dotted key, what is wrong and the fix.

    Several problems found together are reported together, one per line, so a user fixes
    them in one pass instead of one per run.
    """

    def __init__(self, message: str, problems: Sequence[Problem] = ()) -> None:
        super().__init__(message)
        self.problems: tuple[Problem, ...] = tuple(problems) or (Problem(None, message),)

    @classmethod
    def of(cls, problems: Sequence[Problem]) -> ConfigError:
        lines = [str(p) for p in problems]
        if len(lines) == 1:
            return cls(lines[0], problems)
        return cls(f"{len(lines)} problems in the config:\n" + "\n".join(f"  {line}" for line in lines), problems)


def yaml_value(value: Any) -> str:
    """A value as the user would write it in YAML (for messages)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf)
    return text.removesuffix("\n").removesuffix("\n...").strip()
