"""User-facing errors: one line naming the culprit, exit status 2."""

from __future__ import annotations

import sys
from collections.abc import Callable

EXIT_USAGE = 2


class UserError(ValueError):
    """Bad input from the user (a file, a value); its message is printed as a single line."""


def run_cli(fn: Callable[[], None]) -> int:
    """Runs a command body, turning `UserError` into `error: ...` on stderr and exit status 2."""
    try:
        fn()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return 0
