"""The package's shape: rooms with one-way imports (import-linter's contracts in pyproject.toml),
small modules, and one definition of the arithmetic every room shares."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "megatron_gpt"


def test_import_contracts_hold():
    lint = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    result = subprocess.run([lint, "--config", str(REPO / "pyproject.toml")], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout and " kept" in result.stdout, result.stdout


def test_no_module_over_450_lines_and_a_bare_package_root():
    long = {str(p.relative_to(REPO)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 450}
    assert not long, long
    root = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert root == ["__init__.py", "__main__.py"], root


@pytest.mark.parametrize("what, elsewhere, home, definition", [
    ("canonical name prefix", r'f"tied\.\{', "model/names.py", "def canonical_prefix("),
    ("data-parallel size", r"//\s*\(\s*[\w.]*(tp|tensor)\w*\s*\*\s*[\w.]*(pp|pipeline)", "config/dims.py", "def data("),
    ("rank coordinates", r"rank\s*%\s*[\w.]*(tp|tensor)\b", "config/dims.py", "def coordinates("),
    ("threads per rank", r"cores\s*(\(\))?\s*//", "parallel/cpu/threads.py", "def threads_per_rank("),
])
def test_one_definition_each(what, elsewhere, home, definition):
    """The arithmetic is written once, in its home; every other module calls it."""
    assert definition in (PACKAGE / home).read_text(encoding="utf-8")
    places = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
              if re.search(elsewhere, p.read_text(encoding="utf-8")) and str(p.relative_to(PACKAGE)) != home]
    assert not places, f"{what} is computed in {places} as well; it belongs in {home} alone"
