"""`tfds build` for the MGDN builders, without TensorFlow (TFDS's own CLI imports it).

    python -m mgdn_datasets.build NAME[/CONFIG] --manual_dir DIR [--data_dir DIR] [...]

Takes the flags of `tfds build` (`--help` lists them) and writes array_record unless
`--file_format` says otherwise. NAME is a registered builder (`mff_lytro`, `synthetic_fusion/mff`,
...) or a builder folder such as `datasets/mff_lytro`.
"""

from __future__ import annotations

import sys

import simple_parsing
from mgdn_datasets.common import CorruptDataError, DataLayoutError
from tensorflow_datasets.core.registered import DatasetNotFoundError
from tensorflow_datasets.scripts.cli import build as tfds_build

# What bad input raises: a missing or malformed manual_dir, a corrupt file, an unknown name, a
# data_dir that cannot be written.
BUILD_ERRORS = (DataLayoutError, CorruptDataError, DatasetNotFoundError, OSError)


def build(argv: list[str]) -> None:
    """Builds the datasets named in `argv`; raises one of `BUILD_ERRORS` on bad input."""
    argv = list(argv)
    if not any(arg.split("=")[0] == "--file_format" for arg in argv):
        argv += ["--file_format", "array_record"]
    simple_parsing.parse(tfds_build.Args, args=argv).execute()


def main(argv: list[str] | None = None) -> int:
    """The command: `build(argv)` (default: `sys.argv[1:]`); bad input prints `error: ...` (the
    file or value, and for a malformed manual_dir the expected layout) and returns 2."""
    try:
        build(sys.argv[1:] if argv is None else argv)
    except BUILD_ERRORS as e:
        # TFDS's not-found message goes on to list every dataset it knows.
        message = str(e).split("\n")[0] if isinstance(e, DatasetNotFoundError) else str(e)
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
