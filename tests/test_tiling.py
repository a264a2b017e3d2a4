"""Tiled and bfloat16 inference: the tile layout and blending, accuracy against untiled float32
output on Lytro pairs, and the `mgdn-fuse` options."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from mgdn_jax import fuse, image_io, inference
from mgdn_jax.errors import UserError
from mgdn_jax.inference import (
    DEFAULT_OVERLAP,
    blend_weights,
    check_tiling,
    flip_pad,
    jit_forward,
    official_padded_size,
    run,
    run_tiled,
    tile_starts,
)

WINDOW = 4  # of the MFF variant
TILE = 256  # smaller than the 528x528 padded Lytro pairs: 3 x 3 tiles
TILED_PAIRS = ("lytro_01", "lytro_04")  # pairs with official untiled float32 outputs (.npy)
CROP = 248  # official padding makes it 256 x 256: one shape, compiled once, for most tests
# Crops for bfloat16: one tile, and 2 x 1 tiles (376 pads to 384), also fused by the CLI test.
BF16_CROPS = {"lytro_02": (CROP, CROP), "lytro_05": (376, CROP)}


@pytest.fixture(scope="module")
def mff_weights(reference: Path) -> Path:
    return reference / "weights" / "mff_62000_E.pth"


@pytest.fixture(scope="module")
def model(mff_weights: Path):
    from mgdn_jax.convert import from_torch

    return from_torch(mff_weights, "mff")


@pytest.fixture(scope="module")
def forward(model) -> Callable[..., jax.Array]:
    return jit_forward(model)


@pytest.fixture(scope="module")
def forward_bf16(model) -> Callable[..., jax.Array]:
    return jit_forward(model, "bfloat16")


@pytest.fixture(scope="module")
def bf16_results(
    reference: Path, forward: Callable[..., jax.Array], forward_bf16: Callable[..., jax.Array]
) -> dict[str, tuple[list[np.ndarray], np.ndarray, np.ndarray]]:
    """name -> (inputs, float32 output, bfloat16 output) of the BF16_CROPS, tiles of TILE."""
    results = {}
    for name, (rows, cols) in BF16_CROPS.items():
        inputs = _pair(reference, name, rows, cols)
        f32, bf16 = (run(f, inputs, WINDOW, tile=TILE) for f in (forward, forward_bf16))
        results[name] = (inputs, f32, bf16)
    return results


def _pair(reference: Path, name: str, rows: int = CROP, cols: int = CROP) -> list[np.ndarray]:
    """The top-left rows x cols of a Lytro pair, (rows, cols, 3) each."""
    return [
        image_io.read_image(reference / "lytro" / side / f"{name}.jpg")[:rows, :cols]
        for side in ("A", "B")
    ]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean(np.square(a - b))))


@pytest.mark.parametrize("align", [4, 8])
def test_tile_starts_cover_the_image_window_aligned(align: int):
    for tile in (align, 8 * align, 256):
        for overlap in sorted({0, 3, align, tile // 4, tile // 2, tile - align}):
            if overlap > tile - align:  # rejected by check_tiling
                continue
            for size in range(align, 1200, 3 * align):
                starts = tile_starts(size, tile, overlap, align)
                if size <= tile:
                    assert starts == [0]
                    continue
                assert starts[0] == 0 and starts[-1] == size - tile
                assert all(s % align == 0 for s in starts)
                gaps = np.diff(starts)
                assert np.all(gaps > 0) and np.all(tile - gaps >= overlap), (size, tile, overlap)
                # as few tiles as window-aligned steps of at most tile - overlap allow
                step = (tile - overlap) // align * align
                assert len(starts) == -(-(size - tile) // step) + 1


def test_blend_weights_sum_to_one():
    for size, tile, overlap in ((528, 256, DEFAULT_OVERLAP), (4008, 512, 64), (96, 32, 0)):
        starts = tile_starts(size, tile, overlap, WINDOW)
        weights = blend_weights(starts, tile)
        total, cover = np.zeros(size), np.zeros(size, int)
        for s, w in zip(starts, weights):
            total[s : s + tile] += w
            cover[s : s + tile] += 1
        assert np.all(weights > 0)
        np.testing.assert_allclose(total, 1.0, atol=1e-6)
        single = np.concatenate([cover[s : s + tile] == 1 for s in starts])
        assert np.all(weights.reshape(-1)[single] == 1.0)
    assert np.all(blend_weights([0], tile=64) == 1.0)


def test_check_tiling():
    check_tiling(256, 64, 4)
    check_tiling(8, 0, 8)
    for tile, overlap, window in ((100, 0, 4), (0, 0, 4), (-8, 0, 4), (12, 0, 4), (24, 0, 16)):
        with pytest.raises(UserError, match="multiple of"):
            check_tiling(tile, overlap, window)
    for overlap in (-1, 253, 256):
        with pytest.raises(UserError, match="overlap"):
            check_tiling(256, overlap, 4)
    with pytest.raises(UserError, match="batch"):
        check_tiling(256, 64, 4, batch=0)
    assert check_tiling(512, None, 4) == DEFAULT_OVERLAP == 64
    assert check_tiling(64, None, 4) == 16 and check_tiling(8, None, 8) == 0


@pytest.mark.parametrize("pad", ["official", "model"])
@pytest.mark.parametrize("tile_batch", [1, 4])
def test_tiles_reassemble_a_pointwise_forward(pad: str, tile_batch: int):
    """A per-pixel 'network' comes back unchanged through padding, layout, batching (the last
    batch padded) and blending: 101 x 70 pads to 104 x 72, 4 x 3 tiles of 32."""
    rng = np.random.default_rng(0)
    inputs = [rng.random((101, 70, 3), np.float32) for _ in range(2)]

    def pointwise(a: jax.Array, b: jax.Array) -> jax.Array:
        assert a.shape == (tile_batch, 32, 32, 3)
        return 0.75 * a - 0.5 * b

    out = run(pointwise, inputs, WINDOW, pad, tile=32, overlap=8, tile_batch=tile_batch)
    np.testing.assert_allclose(out, 0.75 * inputs[0] - 0.5 * inputs[1], atol=1e-6)


@pytest.mark.parametrize("task", ["fusion", "hdr", "gdsr"])
def test_official_procedure_of_each_task(task: str, monkeypatch: pytest.MonkeyPatch):
    """What the network sees with pad='official': MFF / MEF the flip-padded image, HDR each
    block alone (500 x 500 in the release, 10 x 10 here; edge blocks smaller), GDSR the whole
    image. The stand-in network returns its input's mean, so each output pixel shows which
    region one network call covered."""
    monkeypatch.setattr(inference, "OFFICIAL_HDR_BLOCK", 10)
    x = np.random.default_rng(1).random((24, 28, 1), np.float32)
    seen = []

    def mean(a: jax.Array) -> jax.Array:
        seen.append(a.shape[1:3])
        return np.broadcast_to(a.mean(axis=(1, 2), keepdims=True), a.shape)

    out = run(mean, [x], WINDOW, "official", task)
    assert out.shape == x.shape
    if task == "fusion":
        assert seen == [(32, 32)]
        np.testing.assert_allclose(out, flip_pad(x[None], (32, 32)).mean(), rtol=1e-6)
    elif task == "gdsr":
        assert seen == [(24, 28)]
        np.testing.assert_allclose(out, x.mean(), rtol=1e-6)
    else:
        assert seen == [(r, c) for r in (10, 10, 4) for c in (10, 10, 8)]
        for top in range(0, 24, 10):
            for left in range(0, 28, 10):
                block = (slice(top, top + 10), slice(left, left + 10))
                np.testing.assert_allclose(out[block], x[block].mean(), rtol=1e-6)


def test_official_hdr_edge_block_too_thin(monkeypatch: pytest.MonkeyPatch):
    """An image one row longer than a multiple of the release's HDR block leaves a one-row edge
    block that no reflect padding can fill: one error naming it, before any block runs; the
    model's padding on the whole image still works."""
    monkeypatch.setattr(inference, "OFFICIAL_HDR_BLOCK", 10)
    x = np.zeros((21, 28, 1), np.float32)
    calls = []

    def identity(a: jax.Array) -> jax.Array:
        calls.append(a.shape)
        return a

    with pytest.raises(UserError, match=r"leave a 1x8 edge block of this 21x28 image.*pad='model'"):
        run(identity, [x], WINDOW, "official", "hdr")
    assert calls == []
    assert run(identity, [x], WINDOW, "model", "hdr").shape == x.shape


def test_single_tile_equals_untiled(reference: Path, forward: Callable[..., jax.Array]):
    """`run` with a tile larger than the image takes the untiled path (bit-identical), and the
    tiled path itself, on one tile of blend weight 1, reproduces it exactly too."""
    inputs = _pair(reference, "lytro_03")
    untiled = run(forward, inputs, WINDOW)
    np.testing.assert_array_equal(run(forward, inputs, WINDOW, tile=TILE), untiled)
    size = official_padded_size(CROP, CROP)
    padded = [flip_pad(x[None], size)[0] for x in inputs]
    tiled = run_tiled(forward, padded, WINDOW, tile=TILE)  # blending one tile of weight 1
    np.testing.assert_array_equal(tiled[:CROP, :CROP], untiled)


def test_tiled_close_to_untiled(reference: Path, forward: Callable[..., jax.Array]):
    """Tiles of 256 with the default overlap on whole pairs, against the official (untiled)
    float32 outputs, which our untiled path matches to 1e-4 (test_fuse)."""
    assert len(tile_starts(528, TILE, DEFAULT_OVERLAP, WINDOW)) == 3
    for name in TILED_PAIRS:
        tiled = run(forward, _pair(reference, name, 520, 520), WINDOW, tile=TILE)
        untiled = np.load(reference / "lytro_official" / f"{name}.npy")
        assert tiled.shape == untiled.shape
        assert _psnr(tiled, untiled) >= 40.0, name


def test_bfloat16_close_to_float32(bf16_results: dict):
    for name, (_, f32, bf16) in bf16_results.items():
        assert bf16.dtype == np.float32
        assert _psnr(bf16, f32) >= 45.0, name


def test_cli_tiled_bfloat16_directory(
    reference: Path, mff_weights: Path, bf16_results: dict, tmp_path: Path
):
    """Directory mode with --tile and --dtype, on the crop that runs as 2 x 1 tiles."""
    inputs, _, expected = bf16_results["lytro_05"]
    dirs = [tmp_path / "A", tmp_path / "B"]
    for d, x in zip(dirs, inputs):
        d.mkdir()
        Image.fromarray(image_io.quantize_uint8(x)).save(d / "x.png")  # lossless: 8-bit source
    out = tmp_path / "out"
    argv = ["--variant", "mff", "--weights", str(mff_weights), "--input-dir", *map(str, dirs)]
    argv += ["--output-dir", str(out), "--format", ".npy", "--tile", str(TILE)]
    assert fuse.main([*argv, "--dtype", "bfloat16"]) == 0
    np.testing.assert_allclose(np.load(out / "x.npy"), expected, atol=1e-6)


@pytest.mark.parametrize(
    "options, message",
    [
        (["--tile", "100"], "tile size 100 is not a positive multiple of 8"),
        (["--tile", "0"], "tile size 0"),
        (["--tile", "-16"], "tile size -16"),
        (["--tile", "256", "--tile-overlap", "256"], "tile overlap 256"),
        (["--tile", "64", "--tile-overlap", "-4"], "tile overlap -4"),
        (["--tile-overlap", "32"], "--tile-overlap needs --tile"),
        (["--tile", "64", "--tile-batch", "0"], "tile batch 0"),
    ],
)
def test_bad_tiling_options(
    reference: Path, tmp_path: Path, capsys, options: list[str], message: str
):
    """Checked before anything is read or written (the weights do not even exist)."""
    lytro, out = reference / "lytro", tmp_path / "out"
    argv = ["--variant", "mff", "--weights", str(tmp_path / "none.pth"), *options]
    single = ["--output", str(out / "o.png"), str(lytro / "A/lytro_01.jpg"), str(lytro / "B/x.jpg")]
    directory = ["--input-dir", str(lytro / "A"), str(lytro / "B"), "--output-dir", str(out)]
    for mode in (single, directory):
        assert fuse.main([*argv, *mode]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and message in err
        assert not out.exists()
