"""Reading and writing images, depth maps and HDR files, with one-line errors and atomic writes.

Images are float32 (H, W, C) arrays in [0, 1]; 8-bit files are divided by 255 and 16-bit ones
by 65535; grey images are replicated to RGB and alpha is dropped, as the official scripts do.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mgdn_jax import radiance
from mgdn_jax.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
OUTPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".npy", ".tif", ".tiff", ".hdr")
# PIL modes whose pixel values are read as they are; the others are converted to RGB(A).
DIRECT_MODES = ("L", "LA", "RGB", "RGBA", "I", "I;16")
# OpenCV's default JPEG quality, which the official scripts' cv2.imwrite uses.
JPEG_QUALITY = 95


def _to_unit_float(path: Path, array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535.0
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float32)
    raise UserError(f"{path}: unsupported pixel type {array.dtype}")


def read_image(path: str | Path, channels: int = 3) -> np.ndarray:
    """Reads PNG/JPEG/BMP (8 or 16 bit) or TIFF (8/16 bit, float) as float32 (H, W, channels).

    `channels` = 3 replicates grey to RGB and drops alpha; 1 converts colour to grey (BT.601).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            array = tifffile.imread(path)
        else:
            from PIL import Image

            with Image.open(path) as img:
                img.load()
                if img.mode not in DIRECT_MODES:  # palette, CMYK, YCbCr, bilevel, ...: to RGB
                    img = img.convert("RGBA" if "transparency" in img.info else "RGB")
                array = np.asarray(img.convert("I") if img.mode == "I;16" else img)
                if img.mode in ("I", "I;16"):
                    array = array.astype(np.uint16)
    except UserError:
        raise
    except Exception as e:  # PIL and tifffile raise many types for corrupt files
        raise UserError(f"{path}: cannot read image ({type(e).__name__})") from e
    image = _to_unit_float(path, np.asarray(array))
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 2, 3, 4):
        raise UserError(f"{path}: unsupported image shape {image.shape}")
    if image.shape[-1] in (2, 4):  # drop alpha
        image = image[..., :-1]
    if channels == 3 and image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    elif channels == 1 and image.shape[-1] == 3:
        image = image @ np.array([0.299, 0.587, 0.114], np.float32)
        image = image[..., None]
    return np.ascontiguousarray(image)


def read_depth(path: str | Path) -> np.ndarray:
    """Reads a depth map `.npy` as float32 (H, W); it must be finite and 2-D (or (H, W, 1))."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        depth = np.load(path, allow_pickle=False)
    except Exception as e:
        raise UserError(f"{path}: not a readable .npy depth map ({type(e).__name__})") from e
    if not isinstance(depth, np.ndarray):  # an .npz archive
        raise UserError(f"{path}: not a .npy depth map (an archive of several arrays)")
    if not (np.issubdtype(depth.dtype, np.integer) or np.issubdtype(depth.dtype, np.floating)):
        raise UserError(f"{path}: depth must be integers or floats, got dtype {depth.dtype}")
    if depth.ndim == 3 and depth.shape[-1] == 1:
        depth = depth[..., 0]
    if depth.ndim != 2:
        raise UserError(f"{path}: depth must be an (H, W) array, got shape {depth.shape}")
    if not np.all(np.isfinite(depth)):
        raise UserError(f"{path}: depth map has non-finite values")
    return depth.astype(np.float32)


def read_exposures(path: str | Path, count: int) -> np.ndarray:
    """Reads `count` exposure values in EV stops (Kalantari's exposure.txt) -> times 2**EV."""
    path = Path(path)
    try:
        ev = np.loadtxt(path, dtype=np.float64, ndmin=1)
    except Exception as e:
        raise UserError(f"{path}: cannot read exposure values ({type(e).__name__})") from e
    if ev.shape != (count,):
        raise UserError(f"{path}: expected {count} exposure values, found {ev.size}")
    return exposure_times(ev, str(path))


def exposure_times(ev: np.ndarray, source: str) -> np.ndarray:
    """EV stops -> exposure times 2**EV (float32); `source` names them in the error for a
    value that is not finite or whose time float32 cannot hold."""
    with np.errstate(over="ignore", under="ignore"):
        times = np.power(2.0, np.asarray(ev, np.float64)).astype(np.float32)
    if not np.all(np.isfinite(times)) or not np.all(times > 0):
        values = " ".join(str(float(v)) for v in np.ravel(ev))
        raise UserError(f"{source}: exposure values must be finite EV stops, got {values}")
    return times


def check_writable(path: str | Path) -> Path:
    """Fails early, before any work, if `path` cannot be written or has no known format."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: not writable (it is a directory)")
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise UserError(f"{path}: unknown output format; use one of {', '.join(OUTPUT_SUFFIXES)}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"{path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UserError(f"{path}: not writable")
    return path


def current_umask() -> int:
    """The process umask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yields a temporary path beside `path`, renamed onto it only if the block succeeds."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def quantize_uint8(image: np.ndarray) -> np.ndarray:
    """The official scripts' quantisation: clip to [0, 1], x255, round (half to even)."""
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def write_output(path: str | Path, image: np.ndarray) -> None:
    """Writes a float (H, W, C) result by suffix: .png/.jpg uint8 (official quantisation; JPEG
    at `JPEG_QUALITY`), .npy float32 as is, .tif/.tiff uint16, .hdr Radiance RGBE. Atomic: no
    partial file."""
    path = check_writable(path)
    suffix = path.suffix.lower()
    with atomic_output(path) as tmp:
        if suffix == ".npy":
            with open(tmp, "wb") as f:
                np.save(f, image.astype(np.float32))
        elif suffix == ".hdr":
            radiance.write_hdr(tmp, image)
        elif suffix in (".tif", ".tiff"):
            import tifffile

            tifffile.imwrite(tmp, np.round(np.clip(image, 0, 1) * 65535).astype(np.uint16))
        else:
            from PIL import Image

            pixels = quantize_uint8(image)
            image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
            if suffix in (".jpg", ".jpeg"):
                image.save(tmp, format="JPEG", quality=JPEG_QUALITY)
            else:
                image.save(tmp, format="PNG")


def depth_preview(depth: np.ndarray) -> np.ndarray:
    """A colour rendering (H, W, 3) in [0, 1] of a depth map: near = blue, far = red."""
    lo, hi = float(depth.min()), float(depth.max())
    t = (depth - lo) / (hi - lo) if hi > lo else np.zeros_like(depth)
    anchors = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    colours = np.array([[0, 0, 0.5], [0, 0.5, 1], [0.5, 1, 0.5], [1, 0.5, 0], [0.5, 0, 0]])
    return np.stack([np.interp(t, anchors, colours[:, c]) for c in range(3)], axis=-1)
