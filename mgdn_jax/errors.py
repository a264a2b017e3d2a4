"""User-facing errors: one line naming the culprit, exit status 2."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

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


def _config_file(argv: Sequence[str]) -> str | None:
    """The file named by `--config FILE[:ARG]` or `--config=FILE[:ARG]` in `argv`, if any."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.removeprefix("--config=").split(":")[0]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1].split(":")[0]
    return None


def config_error(e: Exception, argv: Sequence[str]) -> UserError:
    """What ml_collections' `--config` flag raised while loading the config file named in
    `argv` or applying a `--config.FIELD=VALUE` override (it passes on the loader's own
    exception) as one line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    field = re.fullmatch(r"""["']*([A-Za-z_]\w*)["']*""", lines[0] if lines else "")
    if isinstance(e, (AttributeError, KeyError)) and field:
        return UserError(f"unknown config field '{field[1]}' in a --config override")
    if isinstance(e, AttributeError) and "'get_config'" in str(e):
        return UserError(f"--config {_config_file(argv)}: the file defines no get_config()")
    return UserError(f"--config: {lines[-1] if lines else type(e).__name__}")


def make_directory(path: str | Path) -> Path:
    """`path` made absolute and, with its parents, made if missing; a one-line `UserError` when
    it cannot be made (a file in the way, a missing permission) or written to."""
    path = Path(path).absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{path}: cannot create ({e.strerror or e})") from e
    if not os.access(path, os.W_OK):
        raise UserError(f"{path}: not writable")
    return path
