"""`tfds build` for the MGDN builders, without TensorFlow (TFDS's own CLI imports it).

    python -m mgdn_datasets.build NAME[/CONFIG] --manual_dir DIR [--data_dir DIR] [...]

Takes the flags of `tfds build` (`--help` lists them) and writes array_record unless
`--file_format` says otherwise. NAME is a registered builder (`mff_lytro`, `synthetic_fusion/mff`,
...) or a builder folder such as `datasets/mff_lytro`.
"""

from __future__ import annotations

import sys

import simple_parsing
from tensorflow_datasets.scripts.cli import build as tfds_build


def main(argv: list[str] | None = None) -> int:
    """Builds the datasets named in `argv` (default: `sys.argv[1:]`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(arg.split("=")[0] == "--file_format" for arg in argv):
        argv += ["--file_format", "array_record"]
    simple_parsing.parse(tfds_build.Args, args=argv).execute()
    return 0


if __name__ == "__main__":
    sys.exit(main())
