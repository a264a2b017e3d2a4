"""Radiance RGBE (`.hdr`) files in NumPy: the format of Kalantari's `HDRImg.hdr` targets.

Reads flat and run-length-encoded ("new RLE") scanlines in the standard `-Y H +X W`
orientation. Values decode as mantissa * 2^(exponent - 136), the convention of Greg Ward's
`rgbe.c` that OpenCV and FreeImage (imageio) follow, so arrays match what those libraries read.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

_RESOLUTION = re.compile(rb"-Y (\d+) \+X (\d+)")
_MIN_RLE_WIDTH, _MAX_RLE_WIDTH = 8, 0x7FFF


def read_hdr(path: str | Path) -> np.ndarray:
    """A Radiance `.hdr` file -> (H, W, 3) float32 linear RGB. Raises ValueError naming `path`
    if the file is not a readable RGBE image."""
    data = Path(path).read_bytes()
    try:
        return _decode(data)
    except (ValueError, IndexError) as error:
        raise ValueError(f"{path}: not a readable Radiance RGBE file ({error})") from error


def _decode(data: bytes) -> np.ndarray:
    if not data.startswith((b"#?RADIANCE", b"#?RGBE")):
        raise ValueError("missing '#?RADIANCE' signature")
    header_end = data.index(b"\n\n")
    for line in data[:header_end].split(b"\n"):
        if line.startswith(b"FORMAT=") and line != b"FORMAT=32-bit_rle_rgbe":
            raise ValueError(f"unsupported {line.decode(errors='replace')}")
    line_end = data.index(b"\n", header_end + 2)
    match = _RESOLUTION.fullmatch(data[header_end + 2 : line_end].strip())
    if match is None:
        raise ValueError("only the standard '-Y H +X W' orientation is supported")
    height, width = int(match[1]), int(match[2])
    body = np.frombuffer(data, np.uint8, offset=line_end + 1)
    rgbe = np.empty((height, width, 4), np.uint8)
    pos = 0
    for row in range(height):
        head = body[pos : pos + 4]
        rle = (
            _MIN_RLE_WIDTH <= width <= _MAX_RLE_WIDTH
            and head[0] == 2
            and head[1] == 2
            and not head[2] & 0x80
        )
        if not rle:
            rgbe[row] = body[pos : pos + 4 * width].reshape(width, 4)
            pos += 4 * width
            continue
        if (int(head[2]) << 8 | int(head[3])) != width:
            raise ValueError(f"scanline {row}: run-length width does not match the image")
        pos += 4
        for channel in range(4):
            col = 0
            while col < width:
                count = int(body[pos])
                if count > 128:
                    count -= 128
                    rgbe[row, col : col + count, channel] = body[pos + 1]
                    pos += 2
                else:
                    if count == 0:
                        raise ValueError(f"scanline {row}: zero-length run")
                    rgbe[row, col : col + count, channel] = body[pos + 1 : pos + 1 + count]
                    pos += 1 + count
                col += count
            if col != width:
                raise ValueError(f"scanline {row}: runs overrun the scanline")
    exponent = rgbe[..., 3:].astype(np.int32)
    scale = np.where(exponent > 0, np.ldexp(1.0, exponent - 136), 0.0)
    return (rgbe[..., :3] * scale).astype(np.float32)


def write_hdr(path: str | Path, image: np.ndarray) -> None:
    """(H, W, 3) non-negative linear RGB -> a run-length-encoded Radiance `.hdr` file."""
    image = np.asarray(image, np.float64)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected (H, W, 3), got {image.shape}")
    height, width, _ = image.shape
    peak = image.max(axis=2)
    mantissa, exponent = np.frexp(peak)
    scale = np.divide(mantissa * 256.0, peak, out=np.zeros_like(peak), where=peak > 1e-32)
    rgbe = np.zeros((height, width, 4), np.uint8)
    rgbe[..., :3] = np.clip(image * scale[..., None], 0, 255).astype(np.uint8)
    rgbe[..., 3] = np.where(peak > 1e-32, exponent + 128, 0)
    out = [b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n", f"-Y {height} +X {width}\n".encode()]
    rle = _MIN_RLE_WIDTH <= width <= _MAX_RLE_WIDTH
    for row in rgbe:
        if not rle:
            out.append(row.tobytes())
            continue
        out.append(bytes([2, 2, width >> 8, width & 0xFF]))
        out.extend(_encode_channel(row[:, channel]) for channel in range(4))
    Path(path).write_bytes(b"".join(out))


def _encode_channel(values: np.ndarray) -> bytes:
    """One scanline channel as runs (of 3 to 127 equal bytes) and literal dumps (<= 128)."""
    out = bytearray()
    literal: list[int] = []
    i, n = 0, len(values)
    while i < n:
        run = 1
        while i + run < n and run < 127 and values[i + run] == values[i]:
            run += 1
        if run >= 3:
            if literal:
                out += bytes([len(literal), *literal])
                literal = []
            out += bytes([128 + run, values[i]])
            i += run
            continue
        literal.append(int(values[i]))
        i += 1
        if len(literal) == 128:
            out += bytes([128, *literal])
            literal = []
    if literal:
        out += bytes([len(literal), *literal])
    return bytes(out)
