"""What the MGDN builders share: array_record by default, layout errors that name the expected
`manual_dir` layout, and image reading that rejects corrupt or inconsistent files at build time.

Decoded arrays are NHWC-style (H, W, C) NumPy arrays; images are stored as their PNG/JPEG bytes
(RGB, uint8) so that no TensorFlow op is needed to write or read them.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


class DataLayoutError(FileNotFoundError):
    """`manual_dir` is missing or does not have the expected layout."""


class CorruptDataError(ValueError):
    """A source file is unreadable or inconsistent with the files it goes with."""


class ArrayRecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A builder that writes array_record (random access, no TensorFlow) unless told otherwise."""

    def __init__(self, *, file_format: str | None = None, **kwargs: Any):
        super().__init__(file_format=file_format or "array_record", **kwargs)


class ManualBuilder(ArrayRecordBuilder, skip_registration=True):
    """A builder that reads `manual_dir`.

    Subclasses set `MANUAL_DOWNLOAD_INSTRUCTIONS` to the expected `manual_dir` tree; every layout
    error shows it.
    """

    MANUAL_DOWNLOAD_INSTRUCTIONS: ClassVar[str]

    def manual_root(self, dl_manager: tfds.download.DownloadManager) -> Path:
        """The manual directory, which must exist and not be empty."""
        try:
            return Path(dl_manager.manual_dir)
        except AssertionError as error:  # TFDS's check; its message holds the layout.
            raise DataLayoutError(f"{self.name}: {error}") from error

    def layout_error(self, root: Path, missing: Path | str) -> DataLayoutError:
        """The error for a `manual_dir` whose first missing entry is `missing`."""
        return DataLayoutError(
            f"{self.name}: {root} does not have the expected layout; first missing: {missing}\n"
            f"Expected layout of manual_dir:\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}"
        )

    def require_dir(self, root: Path, relative: str) -> Path:
        """`root / relative`, which must be a directory."""
        path = root / relative
        if not path.is_dir():
            raise self.layout_error(root, f"{path}/")
        return path


class FusionBuilder(ManualBuilder, skip_registration=True):
    """A manual builder whose examples are RGB image files (see `fusion_example`)."""

    def _generate_examples(
        self, examples: list[tuple[str, dict[str, Path]]]
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        for name, paths in examples:
            yield name, fusion_example(name, paths)


def list_images(directory: Path) -> dict[str, Path]:
    """Image files directly in `directory` by stem (suffixes in `IMAGE_SUFFIXES`, any case)."""
    images: dict[str, Path] = {}
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            if path.stem in images:
                raise CorruptDataError(f"{path}: two images named {path.stem!r} in {directory}")
            images[path.stem] = path
    return images


def missing_image(directory: Path, stem: str) -> str:
    """How a layout error names an image of any accepted suffix."""
    return f"{directory / stem}.{{{','.join(s[1:] for s in IMAGE_SUFFIXES)}}}"


def match_images(
    builder: ManualBuilder, root: Path, dirs: Mapping[str, tuple[Path, str]]
) -> list[tuple[str, dict[str, Path]]]:
    """Examples made of one image per directory: `dirs` maps a feature name to (directory,
    suffix of the file stem after the example name). Returns (name, {feature: path}) sorted by
    name; a directory that lacks an image another one has raises a layout error naming it."""
    found = {
        key: {
            stem[: len(stem) - len(suffix)]: path
            for stem, path in list_images(directory).items()
            if stem.endswith(suffix)
        }
        for key, (directory, suffix) in dirs.items()
    }
    names = sorted(set().union(*found.values()))
    if not names:
        directory, suffix = next(iter(dirs.values()))
        raise builder.layout_error(root, missing_image(directory, f"NAME{suffix}"))
    for name in names:
        for key, (directory, suffix) in dirs.items():
            if name not in found[key]:
                raise builder.layout_error(root, missing_image(directory, name + suffix))
    return [(name, {key: found[key][name] for key in dirs}) for name in names]


def _rgb8(image: Image.Image) -> np.ndarray:
    """A decoded image as (H, W, 3) uint8 RGB: grey replicated, alpha dropped, palette / CMYK
    converted, and 16-bit grey scaled by 255 / 65535 (as `mgdn-fuse` reads it), not clipped."""
    if image.mode.startswith("I"):
        grey = np.asarray(image.convert("I"), np.float64) * (255 / 65535)
        return np.repeat(np.round(grey).clip(0, 255).astype(np.uint8)[..., None], 3, axis=-1)
    return np.asarray(image.convert("RGB"))


def read_rgb8(path: Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB (`_rgb8`)."""
    try:
        with Image.open(path) as image:
            image.load()
            return _rgb8(image)
    except (OSError, ValueError, SyntaxError) as error:
        raise CorruptDataError(f"{path}: unreadable image ({error})") from error


def rgb8_bytes(path: Path) -> tuple[bytes, tuple[int, int]]:
    """The bytes to store for an RGB image file, and its (H, W), after decoding it fully.

    A JPEG or PNG that is already 8-bit RGB is stored as it is; anything else is converted to
    RGB and stored as PNG.
    """
    try:
        with Image.open(path) as image:
            image.load()
            if image.format in ("JPEG", "PNG") and image.mode == "RGB":
                return path.read_bytes(), (image.height, image.width)
            array = _rgb8(image)
    except (OSError, ValueError, SyntaxError) as error:
        raise CorruptDataError(f"{path}: unreadable image ({error})") from error
    return png_bytes(array), array.shape[:2]


def png_bytes(array: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def check_same_size(sizes: Mapping[Path, tuple[int, int]]) -> None:
    """Raises naming the files if the (H, W) in `sizes` are not all equal."""
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{path} is {h}x{w}" for path, (h, w) in sizes.items())
        raise CorruptDataError(f"images of one example differ in size: {listing}")


def check_finite(path: Path, array: np.ndarray, *, nonnegative: bool = False) -> None:
    """Raises naming `path` if `array` holds NaN or infinity (or, optionally, negatives)."""
    bad = ~np.isfinite(array)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise CorruptDataError(f"{path}: non-finite value {array[index]} at index {index}")
    if nonnegative and (array < 0).any():
        raise CorruptDataError(f"{path}: negative values (minimum {array.min()})")


def fusion_features(*, target: bool) -> tfds.features.FeaturesDict:
    """Two RGB sources (`source_1`, `source_2`), an optional RGB `target`, and a `name`."""
    features: dict[str, tfds.features.FeatureConnector] = {
        "source_1": tfds.features.Image(shape=(None, None, 3)),
        "source_2": tfds.features.Image(shape=(None, None, 3)),
        "name": tfds.features.Text(),
    }
    if target:
        features["target"] = tfds.features.Image(shape=(None, None, 3))
    return tfds.features.FeaturesDict(features)


def fusion_example(name: str, paths: Mapping[str, Path]) -> dict[str, Any]:
    """The example for image files keyed by feature name, all of which must be readable RGB
    images of one size."""
    encoded = {key: rgb8_bytes(path) for key, path in paths.items()}
    check_same_size({paths[key]: size for key, (_, size) in encoded.items()})
    return {"name": name, **{key: data for key, (data, _) in encoded.items()}}
