"""Print the requirements that setup.py declares (install_requires plus the named extras), one per
line, without running setup.py: the image installs its dependencies from this list in a layer that
needs only setup.py, so a change to the code (or README.md, which setup.py reads) does not
reinstall them.

    python docker/requirements.py setup.py hf,mpi > requirements.txt
"""

from __future__ import annotations

import ast
import sys


def declared(setup_py: str) -> tuple[list[str], dict[str, list[str]]]:
    tree = ast.parse(open(setup_py, encoding="utf-8").read(), setup_py)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            keywords = {k.arg: k.value for k in node.keywords}
            try:
                requires = ast.literal_eval(keywords["install_requires"])
                extras = ast.literal_eval(keywords["extras_require"]) if "extras_require" in keywords else {}
            except (KeyError, ValueError) as error:
                raise SystemExit(f"{setup_py}: install_requires/extras_require must be literal lists "
                                 f"and dicts for docker/requirements.py to read them ({error!r})")
            return list(requires), dict(extras)
    raise SystemExit(f"{setup_py}: no setup(...) call found")


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    requires, extras = declared(argv[1])
    wanted = [e.strip() for e in (argv[2] if len(argv) == 3 else "").split(",") if e.strip()]
    unknown = sorted(set(wanted) - set(extras))
    if unknown:
        print(f"error: unknown extra(s) {', '.join(unknown)}; setup.py has {', '.join(sorted(extras))}",
              file=sys.stderr)
        return 2
    lines = dict.fromkeys(requires + [r for e in wanted for r in extras[e]])  # ordered, no duplicates
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
