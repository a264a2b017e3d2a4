"""End-to-end `mgdn-fuse`: official parity on the 20 Lytro pairs, every variant, bad input."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from mgdn_jax import fuse, image_io, radiance
from mgdn_jax.convert import from_torch


def _fuse(*args: str | Path) -> int:
    return fuse.main([str(a) for a in args])


def _network(weights: Path, variant: str, inputs: list[np.ndarray]) -> np.ndarray:
    """The official-weights network on one example: (H, W, C_i) inputs -> (H, W, C_out)."""
    model = from_torch(weights, variant)
    return np.asarray(model(*(np.asarray(x, np.float32)[None] for x in inputs))[0])


@pytest.fixture(scope="module")
def mff_weights(reference: Path) -> Path:
    return reference / "weights" / "mff_62000_E.pth"


def _fuse_lytro_dir(reference: Path, weights: Path, names: list[str], tmp: Path, fmt: str) -> Path:
    """Directory mode on the Lytro pairs `names`: one weight conversion and one compilation per
    image size for all of them. Returns the output directory."""
    for side in ("A", "B"):
        (tmp / side).mkdir()
        for name in names:
            (tmp / side / f"{name}.jpg").symlink_to(reference / "lytro" / side / f"{name}.jpg")
    out = tmp / "out"
    args = ("--input-dir", tmp / "A", tmp / "B", "--output-dir", out, "--format", fmt)
    assert _fuse("--variant", "mff", "--weights", weights, *args) == 0
    assert sorted(p.stem for p in out.glob(f"*{fmt}")) == names
    return out


def test_lytro_png_matches_official(reference: Path, mff_weights: Path, tmp_path: Path):
    """Directory mode, PNG output, on two Lytro pairs (tests/test_evaluate.py runs all 20
    through mgdn-eval and checks every PNG there)."""
    names = ["lytro_07", "lytro_20"]
    out = _fuse_lytro_dir(reference, mff_weights, names, tmp_path, ".png")
    for name in names:
        ours = np.asarray(Image.open(out / f"{name}.png")).astype(np.int32)
        ref = np.asarray(Image.open(reference / "lytro_official" / f"{name}.png")).astype(np.int32)
        diff = np.abs(ours - ref)
        assert diff.max() <= 1, name
        assert (diff == 0).mean() >= 0.999, name


def test_lytro_npy_matches_official(reference: Path, mff_weights: Path, tmp_path: Path):
    """The unquantised float32 outputs of every pair with an official .npy output."""
    refs = sorted((reference / "lytro_official").glob("*.npy"))
    assert len(refs) == 5
    out = _fuse_lytro_dir(reference, mff_weights, [r.stem for r in refs], tmp_path, ".npy")
    for ref_npy in refs:
        ours, ref = np.load(out / ref_npy.name), np.load(ref_npy)
        assert ours.shape == ref.shape and ours.dtype == np.float32
        assert np.abs(ours - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max()), ref_npy.stem


def test_converted_directory_and_model_padding(reference: Path, mff_weights: Path, tmp_path):
    from mgdn_jax.convert import main as convert_main

    converted = tmp_path / "mff"
    assert convert_main([str(mff_weights), "--variant", "mff", "--output", str(converted)]) == 0
    a = tmp_path / "a.png"
    b = tmp_path / "b.png"
    for src, dst in (
        (reference / "lytro/A/lytro_05.jpg", a),
        (reference / "lytro/B/lytro_05.jpg", b),
    ):
        Image.open(src).crop((300, 100, 370, 145)).save(dst)  # 70x45, as the activation file
    out = tmp_path / "o.npy"
    assert (
        _fuse("--variant", "mff", "--weights", converted, "--pad", "model", "--output", out, a, b)
        == 0
    )
    acts = np.load(reference / "activations" / "mff_pretrained_lytro05_45x70.npz")
    # The activation crops came from the JPEGs decoded the same way.
    np.testing.assert_allclose(image_io.read_image(a)[None], acts["input0"], atol=1e-7)
    np.testing.assert_allclose(np.load(out)[None], acts["output"], atol=1e-4)
    mask = image_io.current_umask()
    assert converted.stat().st_mode & 0o777 == 0o777 & ~mask
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask
    tif = tmp_path / "o.tif"
    assert _fuse("--variant", "mff", "--weights", converted, "--output", tif, a, b) == 0
    assert tifffile.imread(tif).dtype == np.uint16


def test_mef_directory_mode(reference: Path, tmp_path: Path):
    """Two MEF pairs through directory mode (`--format` without its dot), each output equal to
    the network run on the pair flip-padded here as the official script pads: the flipped image
    appended below, then to the right, to the next multiple of 8 beyond each side."""
    under, over = tmp_path / "under", tmp_path / "over"
    under.mkdir()
    over.mkdir()
    for name in ("Arno", "ArchSequence"):
        for src_dir, dst_dir, tag in (
            (reference / "mef_samples/under", under, "A"),
            (reference / "mef_samples/over", over, "B"),
        ):
            src = next(src_dir.glob(f"{name}_{tag}.*"))
            Image.open(src).convert("RGB").resize((40, 32)).save(dst_dir / f"{name}_{tag}.png")
    out = tmp_path / "out"
    rc = _fuse(
        "--variant",
        "mef",
        "--weights",
        reference / "variants/mef_random.pth",
        "--input-dir",
        under,
        over,
        "--output-dir",
        out,
        "--format",
        "npy",
    )
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["ArchSequence_A.npy", "Arno_A.npy"]
    for name in ("Arno", "ArchSequence"):
        pair = [image_io.read_image(d / f"{name}_{t}.png") for d, t in ((under, "A"), (over, "B"))]
        padded = []
        for x in pair:  # 32 x 40 -> 40 x 48
            x = np.concatenate([x, x[::-1]], axis=0)[:40]
            padded.append(np.concatenate([x, x[:, ::-1]], axis=1)[:, :48])
        expected = _network(reference / "variants/mef_random.pth", "mef", padded)[:32, :40]
        np.testing.assert_allclose(np.load(out / f"{name}_A.npy"), expected, atol=1e-5)


def test_hdr_writes_radiance(reference: Path, tmp_path: Path):
    """Radiance .hdr and float .npy outputs from exposures given as a file and as EV stops, both
    the network run on LDR || LDR^2.2 / 2^EV built here."""
    rng = np.random.default_rng(0)
    frames = []
    for i in range(3):
        path = tmp_path / f"ldr{i}.tif"
        tifffile.imwrite(path, rng.integers(0, 65535, (24, 32, 3), dtype=np.uint16))
        frames.append(path)
    (tmp_path / "exposure.txt").write_text("0\n2\n4\n")
    out = tmp_path / "out.hdr"
    rc = _fuse(
        "--variant",
        "hdr",
        "--weights",
        reference / "variants/hdr_random.pth",
        "--exposure-file",
        tmp_path / "exposure.txt",
        "--output",
        out,
        *frames,
    )
    assert rc == 0
    npy = tmp_path / "out.npy"
    rc = _fuse(
        "--variant",
        "hdr",
        "--weights",
        reference / "variants/hdr_random.pth",
        "--exposures",
        "0",
        "2",
        "4",
        "--output",
        npy,
        *frames,
    )
    assert rc == 0
    hdr, linear = radiance.read_hdr(out), np.load(npy)
    assert hdr.shape == linear.shape == (24, 32, 3)
    # RGBE shares one exponent per pixel: 8-bit mantissas relative to the brightest channel.
    assert np.all(np.abs(hdr - linear) <= linear.max(axis=-1, keepdims=True) * 2**-7 + 1e-6)
    # The network's inputs built here from the definition: LDR in [0, 1] || LDR^2.2 / 2^EV.
    ldrs = [tifffile.imread(f).astype(np.float64) / 65535.0 for f in frames]
    inputs = [np.concatenate([x, x**2.2 / 2.0**ev], -1) for x, ev in zip(ldrs, (0, 2, 4))]
    expected = _network(reference / "variants/hdr_random.pth", "hdr", inputs)
    np.testing.assert_allclose(linear, expected, atol=1e-5)


def test_gdsr_depth_and_preview(reference: Path, tmp_path: Path):
    """The depth in metres, equal to the network run on inputs built here as the release builds
    them, and its preview."""
    rgb = reference / "gdsr_samples/RGB/1444.jpg"
    depth = np.load(reference / "gdsr_samples/Depth/1444.npy")
    lr = tmp_path / "lr.npy"
    np.save(lr, depth[::4, ::4])
    out = tmp_path / "depth.npy"
    rc = _fuse(
        "--variant",
        "gdsr",
        "--weights",
        reference / "variants/gdsr_random.pth",
        "--scale",
        "4",
        "--output",
        out,
        rgb,
        lr,
    )
    assert rc == 0
    pred = np.load(out)
    preview = np.asarray(Image.open(tmp_path / "depth.preview.png"))
    assert pred.shape == depth.shape and preview.shape == depth.shape + (3,)
    # The release's GDSR inputs built here: the RGB / 255 standardised with ImageNet's mean and
    # std, the low-resolution depth min/max-normalised and upsampled by PyTorch's bicubic; the
    # output clipped to [0, 1] and de-normalised.
    import torch

    image = np.asarray(Image.open(rgb).convert("RGB"), np.float64) / 255.0
    image = (image - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    low = depth[::4, ::4]
    lo, hi = low.min(), low.max()
    up = torch.nn.functional.interpolate(
        torch.from_numpy((low - lo) / (hi - lo))[None, None].double(),
        size=depth.shape,
        mode="bicubic",
        align_corners=False,
    )[0, 0, ..., None].numpy()
    normalised = _network(reference / "variants/gdsr_random.pth", "gdsr", [image, up])
    expected = np.clip(normalised[..., 0], 0.0, 1.0) * (hi - lo) + lo
    np.testing.assert_allclose(pred, expected, atol=1e-5 * (hi - lo))


def test_image_modes_read_as_their_colours(tmp_path: Path):
    """Palette, CMYK and bilevel files read as the colours they show (as OpenCV, which the
    official scripts use, decodes them); 16-bit grey scales by 65535."""
    rgb = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [255, 255, 0]]], np.uint8)
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    Image.fromarray(rgb[..., 0] > 0).save(tmp_path / "bilevel.png")
    Image.fromarray(np.array([[0, 1000], [30000, 65535]], np.uint16)).save(tmp_path / "g16.png")
    for name in ("palette.png", "cmyk.jpg"):
        np.testing.assert_allclose(image_io.read_image(tmp_path / name) * 255, rgb, atol=1)
    bilevel = image_io.read_image(tmp_path / "bilevel.png")
    np.testing.assert_array_equal(bilevel, np.repeat((rgb[..., :1] > 0).astype(np.float32), 3, -1))
    grey = image_io.read_image(tmp_path / "g16.png")[..., 0]
    np.testing.assert_allclose(grey, [[0, 1000 / 65535], [30000 / 65535, 1]], rtol=1e-6)


def test_jpeg_output_quality(tmp_path: Path):
    """.jpg outputs use OpenCV's default quality (95), not Pillow's (75)."""
    rng = np.random.default_rng(0)
    image = rng.random((64, 64, 3)).astype(np.float32)
    image_io.write_output(tmp_path / "out.jpg", image)
    with Image.open(tmp_path / "out.jpg") as written:
        tables = written.quantization
    reference = tmp_path / "q95.jpg"
    Image.fromarray(image_io.quantize_uint8(image)).save(reference, quality=95)
    with Image.open(reference) as expected:
        assert tables == expected.quantization


def _bad(capsys, tmp_path: Path, *args) -> str:
    before = set(tmp_path.rglob("*"))
    assert _fuse(*args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert set(tmp_path.rglob("*")) == before, "a failed run left files behind"
    return err


def test_bad_input(reference: Path, mff_weights: Path, tmp_path: Path, capsys):
    a, b = reference / "lytro/A/lytro_01.jpg", reference / "lytro/B/lytro_01.jpg"
    out = tmp_path / "out.png"
    mff = ("--variant", "mff", "--weights", mff_weights)
    assert "missing.jpg" in _bad(
        capsys, tmp_path, *mff, "--output", out, a, tmp_path / "missing.jpg"
    )
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    assert "corrupt.png" in _bad(capsys, tmp_path, *mff, "--output", out, a, corrupt)
    other = reference / "mef_samples/under/Arno_A.png"
    assert "Arno_A.png" in _bad(capsys, tmp_path, *mff, "--output", out, a, other)
    assert "takes 2 inputs" in _bad(capsys, tmp_path, *mff, "--output", out, a)
    gdsr = reference / "variants/gdsr_random.pth"
    assert "gdsr_random.pth" in _bad(
        capsys, tmp_path, "--variant", "mff", "--weights", gdsr, "--output", out, a, b
    )
    assert "nowhere" in _bad(capsys, tmp_path, *mff, "--output", tmp_path / "nowhere/o.png", a, b)
    assert "not writable" in _bad(capsys, tmp_path, *mff, "--output", tmp_path, a, b)
    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.zeros((3, 3, 3), np.uint8)).save(tiny)
    assert "too small" in _bad(capsys, tmp_path, *mff, "--output", out, tiny, tiny)
    depth = tmp_path / "lr.npy"
    np.save(depth, np.ones((10, 10), np.float32))
    assert "lr.npy" in _bad(
        capsys,
        tmp_path,
        "--variant",
        "gdsr",
        "--weights",
        gdsr,
        "--output",
        tmp_path / "d.npy",
        reference / "gdsr_samples/RGB/1444.jpg",
        depth,
    )
    gdsr_png = tmp_path / "d.png"
    gdsr_args = ("--variant", "gdsr", "--weights", gdsr, "--output", gdsr_png)
    message = _bad(capsys, tmp_path, *gdsr_args, reference / "gdsr_samples/RGB/1444.jpg", depth)
    assert "d.png" in message and ".npy" in message
    assert "exposures" in _bad(
        capsys,
        tmp_path,
        "--variant",
        "hdr",
        "--weights",
        reference / "variants/hdr_random.pth",
        "--output",
        tmp_path / "o.hdr",
        a,
        a,
        a,
    )


def test_non_finite_input_and_broken_converted_config(
    reference: Path, mff_weights: Path, tmp_path: Path, capsys
):
    """A NaN pixel (which spreads to the whole output through MGCA's statistics), exposures
    that are not finite, a converted checkpoint whose config.json is not a model config: one
    error each, nothing written."""
    image = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    clean, nan = tmp_path / "clean.tif", tmp_path / "nan.tif"
    tifffile.imwrite(clean, image, photometric="rgb")
    image[3, 4, 1] = np.nan
    tifffile.imwrite(nan, image, photometric="rgb")
    mff = ("--variant", "mff", "--weights", mff_weights, "--output", tmp_path / "o.png")
    message = _bad(capsys, tmp_path, *mff, nan, clean)
    assert "nan.tif" in message and "not finite" in message
    hdr = ("--variant", "hdr", "--weights", reference / "variants/hdr_random.pth")
    frames = (clean, clean, clean)
    out = ("--output", tmp_path / "o.hdr")
    message = _bad(capsys, tmp_path, *hdr, "--exposures", "-2", "nan", "2", *out, *frames)
    assert "--exposures" in message and "nan" in message
    exposure_file = tmp_path / "exposure.txt"
    exposure_file.write_text("0\n2\n2000\n")
    message = _bad(capsys, tmp_path, *hdr, "--exposure-file", exposure_file, *out, *frames)
    assert "exposure.txt" in message and "finite" in message
    for name, text in (("truncated", "{"), ("list", "[1, 2]"), ("no_depths", '{"variant": "mff"}')):
        converted = tmp_path / name
        converted.mkdir()
        (converted / "config.json").write_text(text)
        args = ("--variant", "mff", "--weights", converted, "--output", tmp_path / "o.png")
        message = _bad(capsys, tmp_path, *args, clean, clean)
        assert f"{converted / 'config.json'}: not an MGDN model config" in message


def test_depth_files_of_the_wrong_kind(reference: Path, tmp_path: Path, capsys):
    """A depth archive (.npz), complex or boolean depth: one error naming the file and what is
    wrong with it."""
    rgb = reference / "gdsr_samples/RGB/1444.jpg"
    good = np.load(reference / "gdsr_samples/Depth/1444.npy")[::4, ::4]
    cases = {
        "archive.npy": ("several arrays", lambda f: np.savez(f, depth=good)),
        "complex.npy": ("dtype complex", lambda f: np.save(f, good.astype(np.complex64))),
        "bool.npy": ("dtype bool", lambda f: np.save(f, good > good.mean())),
    }
    for name, (expected, write) in cases.items():
        with open(tmp_path / name, "wb") as f:
            write(f)
    weights = reference / "variants/gdsr_random.pth"
    gdsr = ("--variant", "gdsr", "--weights", weights, "--output", tmp_path / "d.npy", rgb)
    for name, (expected, _) in cases.items():
        message = _bad(capsys, tmp_path, *gdsr, tmp_path / name)
        assert name in message and expected in message, message


@pytest.mark.parametrize(
    "variant, extra, message",
    [
        ("mff", ("--scale", "4"), "--scale applies to GDSR only, not to 'mff'"),
        ("gdsr", ("--scale", "0"), "--scale must be a positive integer, got 0"),
        ("mef", ("--exposures", "0", "2"), "--exposures applies to HDR only, not to 'mef'"),
        ("mff", ("--exposure-file", "e.txt"), "--exposure-file applies to HDR only"),
        ("hdr", ("--exposures", "0", "2", "4", "--exposure-file", "e.txt"), "not both"),
        ("mff", ("--format", ".tif"), "--format applies with --input-dir only"),
        ("mff", ("--output-dir", "outputs"), "--output-dir needs --input-dir"),
    ],
)
def test_options_that_do_not_apply(tmp_path: Path, capsys, variant, extra, message):
    """An option the variant or the mode does not use is an error before anything is read (the
    weights and inputs here do not exist)."""
    args = ("--variant", variant, "--weights", tmp_path / "w.pth", "--output", tmp_path / "o.png")
    assert message in _bad(capsys, tmp_path, *args, tmp_path / "a.png", *extra)


def test_directory_mode_bad_input_leaves_nothing(mff_weights: Path, tmp_path: Path, capsys):
    """Bad directory-mode input stops before the output directory is made."""
    dirs = [tmp_path / "A", tmp_path / "B"]
    for d, count in zip(dirs, (2, 1)):
        d.mkdir()
        for i in range(count):
            Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(d / f"x{i}.png")
    mff = ("--variant", "mff", "--weights", mff_weights, "--input-dir", *dirs)
    out = ("--output-dir", tmp_path / "new" / "out")
    assert "different numbers of files" in _bad(capsys, tmp_path, *mff, *out)
    (dirs[1] / "x1.png").write_bytes((dirs[1] / "x0.png").read_bytes())
    assert "--format .xyz" in _bad(capsys, tmp_path, *mff, *out, "--format", ".xyz")
    a_file = tmp_path / "A" / "x0.png"
    assert "is not a directory" in _bad(capsys, tmp_path, *mff, "--output-dir", a_file)


def test_console_script(reference: Path, tmp_path: Path):
    exe = shutil.which("mgdn-fuse") or pytest.fail("mgdn-fuse is not installed")
    result = subprocess.run(
        [
            exe,
            "--variant",
            "mff",
            "--weights",
            str(tmp_path / "none.pth"),
            "--output",
            str(tmp_path / "o.png"),
            "a.jpg",
            "b.jpg",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: a.jpg: no such file"]
    module = subprocess.run(
        [sys.executable, "-m", "mgdn_jax.fuse", "--help"], capture_output=True, text=True
    )
    assert module.returncode == 0 and "--variant" in module.stdout
