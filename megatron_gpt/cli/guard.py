"""Expected failures of a command print one line, not a traceback."""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable

Handler = Callable[[argparse.Namespace], int]


def expected(*errors: type[BaseException]) -> Callable[[Handler], Handler]:
    """Decorate a handler: any of `errors` becomes `error: MESSAGE` on stderr and exit code 2."""

    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        def run(args: argparse.Namespace) -> int:
            try:
                return handler(args)
            except errors as error:
                print(f"error: {error}", file=sys.stderr)
                return 2

        return run

    return decorate
