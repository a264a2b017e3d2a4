"""The TFDS builders (`mgdn_datasets`): `tfds build`-style preparation of each one on tiny
fixtures (dataset_fixtures.py), the values they store, the errors for bad data, and packaging."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import mgdn_datasets
import numpy as np
import pytest
import tensorflow_datasets as tfds
from dataset_fixtures import (
    KALANTARI_EV,
    KALANTARI_SIZE,
    NYU_TRAIN_IDS,
    REPO,
    SICE_GAINS,
    make_kalantari,
    make_nyuv2,
    make_realmff,
    make_sice,
    prepare,
)
from mgdn_datasets import build, common
from PIL import Image

from mgdn_jax import radiance

# The session fixtures (data_dir, lytro, kalantari, ...) that build every dataset once.
pytest_plugins = ["dataset_fixtures"]


def split_sizes(name: str, data_dir: Path) -> dict[str, int]:
    return {
        split: len(source) for split, source in tfds.data_source(name, data_dir=data_dir).items()
    }


def by_name(source) -> dict[str, dict]:
    return {source[i]["name"].decode(): source[i] for i in range(len(source))}


def test_lytro(lytro, reference):
    assert split_sizes("mff_lytro", lytro) == {"test": 20}
    examples = by_name(tfds.data_source("mff_lytro", split="test", data_dir=lytro))
    assert sorted(examples) == [f"lytro_{i:02d}" for i in range(1, 21)]
    example = examples["lytro_07"]
    assert set(example) == {"source_1", "source_2", "name"}
    for key, folder in (("source_1", "A"), ("source_2", "B")):
        expected = np.asarray(Image.open(reference / "lytro" / folder / "lytro_07.jpg"))
        np.testing.assert_array_equal(example[key], expected)


def test_mef_benchmark(mef_benchmark, reference):
    source = tfds.data_source("mef_benchmark", split="test", data_dir=mef_benchmark)
    examples = by_name(source)
    assert sorted(examples) == ["507", "AirBellowsGap", "AmikeusBeaverDam", "ArchSequence", "Arno"]
    arch = examples["ArchSequence"]
    assert arch["source_1"].shape == (1024, 669, 3)
    under = np.asarray(Image.open(reference / "mef_samples" / "under" / "507_A.tif"))
    np.testing.assert_array_equal(examples["507"]["source_1"], under)


def test_nyuv2_split_and_values(nyuv2, reference):
    assert split_sizes("gdsr_nyuv2", nyuv2) == {"train": len(NYU_TRAIN_IDS), "test": 5}
    test = by_name(tfds.data_source("gdsr_nyuv2", split="test", data_dir=nyuv2))
    assert sorted(test) == ["1444", "1445", "1446", "1447", "1448"]
    depth = np.load(reference / "gdsr_samples" / "Depth" / "1446.npy")
    np.testing.assert_array_equal(test["1446"]["depth"], depth)
    assert test["1446"]["rgb"].shape == (480, 640, 3)
    train = by_name(tfds.data_source("gdsr_nyuv2", split="train", data_dir=nyuv2))
    assert sorted(train, key=int) == [str(i) for i in NYU_TRAIN_IDS]


def test_kalantari(kalantari):
    assert split_sizes("hdr_kalantari", kalantari) == {"train": 3, "test": 2}
    examples = by_name(tfds.data_source("hdr_kalantari", split="test", data_dir=kalantari))
    assert sorted(examples) == ["EXTRA/Lake", "PAPER/Barbeque"]
    example = examples["PAPER/Barbeque"]
    assert example["ldr"].shape == (3, *KALANTARI_SIZE, 3) and example["ldr"].dtype == np.uint16
    assert example["target"].shape == (*KALANTARI_SIZE, 3) and example["target"].dtype == np.float32
    np.testing.assert_array_equal(example["exposure_ev"], KALANTARI_EV)
    # The frames are stored in file order, i.e. increasing exposure.
    assert (np.diff(example["ldr"].astype(float).mean(axis=(1, 2, 3))) > 0).all()


def test_sice_picks_darkest_and_brightest(sice, manual_root):
    assert split_sizes("mef_sice", sice) == {"train": 3, "test": 2}
    examples = by_name(tfds.data_source("mef_sice", split="test", data_dir=sice))
    assert sorted(examples) == ["7", "8"]
    part = manual_root / "sice" / "Dataset_Part2"
    expected = {
        "source_1": "7/1.JPG",
        "source_2": f"7/{len(SICE_GAINS)}.JPG",
        "target": "Label/7.JPG",
    }
    for key, relative in expected.items():
        np.testing.assert_array_equal(examples["7"][key], np.asarray(Image.open(part / relative)))


def test_realmff_configs(realmff):
    assert split_sizes("mff_realmff", realmff) == {"train": 4, "test": 2}
    with_reference = tfds.data_source("mff_realmff", split="train", data_dir=realmff)
    assert set(with_reference[0]) == {"source_1", "source_2", "target", "name"}
    without = tfds.data_source("mff_realmff/without_reference", split="test", data_dir=realmff)
    assert set(without[0]) == {"source_1", "source_2", "name"}


def test_synthetic_tiny(synthetic_tiny):
    for config in ("mff_tiny", "mef_tiny"):
        name = f"synthetic_fusion/{config}"
        assert split_sizes(name, synthetic_tiny) == {"train": 8, "test": 2}
        example = tfds.data_source(name, split="train", data_dir=synthetic_tiny)[0]
        for key in ("source_1", "source_2", "target"):
            assert example[key].shape == (64, 64, 3) and example[key].dtype == np.uint8
        assert not np.array_equal(example["source_1"], example["target"])


def test_synthetic_mef_exposures(synthetic_tiny):
    for example in tfds.data_source(
        "synthetic_fusion/mef_tiny", split="train", data_dir=synthetic_tiny
    ):
        under, over = example["source_1"].mean(), example["source_2"].mean()
        assert under < example["target"].mean() < over


def test_synthetic_mff_sources_complement(synthetic_tiny):
    source = tfds.data_source("synthetic_fusion/mff_tiny", split="train", data_dir=synthetic_tiny)
    for example in source:
        target = example["target"].astype(float)
        error_1 = np.abs(example["source_1"] - target).mean(axis=2)
        error_2 = np.abs(example["source_2"] - target).mean(axis=2)
        # Each source is close to the target where the other is not.
        assert (error_1 < error_2).mean() > 0.1 and (error_2 < error_1).mean() > 0.1


def test_synthetic_is_deterministic_and_default_builds_fast(tmp_path, synthetic_tiny):
    start = time.perf_counter()
    prepare("synthetic_fusion/mff", tmp_path)
    assert time.perf_counter() - start < 60
    assert split_sizes("synthetic_fusion/mff", tmp_path) == {"train": 96, "test": 8}
    prepare("synthetic_fusion/mff_tiny", tmp_path)
    first = by_name(tfds.data_source("synthetic_fusion/mff_tiny", split="train", data_dir=tmp_path))
    again = by_name(
        tfds.data_source("synthetic_fusion/mff_tiny", split="train", data_dir=synthetic_tiny)
    )
    assert first.keys() == again.keys()
    for name, example in first.items():
        for key in ("source_1", "source_2", "target"):
            np.testing.assert_array_equal(example[key], again[name][key])


# --- errors: missing or malformed manual_dir, corrupt or inconsistent files ---


def build_error(name: str, tmp_path: Path, manual_dir: Path) -> Exception:
    with pytest.raises(Exception) as info:
        prepare(name, tmp_path / "data", manual_dir)
    return info.value


def test_missing_manual_dir_names_layout(tmp_path):
    error = build_error("mff_lytro", tmp_path, tmp_path / "nowhere")
    assert isinstance(error, common.DataLayoutError)
    assert str(tmp_path / "nowhere") in str(error)
    assert "B/lytro_01.jpg ... B/lytro_20.jpg" in str(error)  # the expected layout


def test_command_reports_bad_input_in_one_error(tmp_path, capsys):
    """`python -m mgdn_datasets.build` turns the builders' errors into `error: ...` and exit
    status 2, as the other command-line tools do: a missing manual_dir, an unknown name."""
    nowhere = tmp_path / "nowhere"
    args = ["--data_dir", str(tmp_path / "data")]
    assert build.main(["mff_lytro", "--manual_dir", str(nowhere), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: mff_lytro: Manual directory {nowhere} does not exist")
    assert build.main(["no_such_dataset", *args]) == 2
    assert capsys.readouterr().err == "error: Dataset no_such_dataset not found.\n"


def test_malformed_manual_dir_names_first_missing_file(tmp_path, reference):
    manual = tmp_path / "lytro"
    for folder in ("A", "B"):
        (manual / folder).mkdir(parents=True)
        for image in sorted((reference / "lytro" / folder).glob("*.jpg"))[:3]:
            (manual / folder / image.name).symlink_to(image)
    (manual / "B" / "lytro_02.jpg").unlink()
    error = build_error("mff_lytro", tmp_path, manual)
    assert isinstance(error, common.DataLayoutError)
    assert f"first missing: {manual / 'B' / 'lytro_02'}." in str(error)
    assert "B/lytro_01.jpg ... B/lytro_20.jpg" in str(error)


def test_missing_directory_is_named(tmp_path):
    make_kalantari(tmp_path / "k")
    (tmp_path / "k" / "Training" / "002" / "HDRImg.hdr").unlink()
    error = build_error("hdr_kalantari", tmp_path, tmp_path / "k")
    assert isinstance(error, common.DataLayoutError)
    assert f"first missing: {tmp_path / 'k' / 'Training' / '002' / 'HDRImg.hdr'}" in str(error)


def test_unreadable_image_is_named(tmp_path):
    make_realmff(tmp_path / "m")
    broken = tmp_path / "m" / "test" / "B" / "q02.png"
    broken.write_bytes(broken.read_bytes()[:60])
    error = build_error("mff_realmff", tmp_path, tmp_path / "m")
    assert isinstance(error, common.CorruptDataError)
    assert str(broken) in str(error)


def test_stored_images_scale_16_bit_grey(tmp_path):
    """A 16-bit grey source is stored as 8-bit RGB scaled by 255 / 65535 (the way `mgdn-fuse`
    reads the file), not clipped to white; a palette image as its colours."""
    path = tmp_path / "g16.png"
    Image.fromarray(np.array([[0, 1000], [30000, 65535]], np.uint16)).save(path)
    expected = np.round(np.array([[0, 1000], [30000, 65535]]) * 255 / 65535)
    np.testing.assert_array_equal(common.read_rgb8(path), np.repeat(expected[..., None], 3, -1))
    data, size = common.rgb8_bytes(path)
    assert size == (2, 2)
    stored = np.asarray(Image.open(io.BytesIO(data)))
    np.testing.assert_array_equal(stored, common.read_rgb8(path))
    rgb = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [255, 255, 0]]], np.uint8)
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
    np.testing.assert_array_equal(common.read_rgb8(tmp_path / "palette.png"), rgb)


def test_pair_of_different_sizes_is_named(tmp_path):
    make_sice(tmp_path / "s")
    label = tmp_path / "s" / "Dataset_Part1" / "Label" / "2.JPG"
    Image.open(label).resize((30, 20)).save(label)
    error = build_error("mef_sice", tmp_path, tmp_path / "s")
    assert isinstance(error, common.CorruptDataError)
    assert f"{label} is 20x30" in str(error)


def test_nan_in_depth_is_named(tmp_path, reference):
    make_nyuv2(tmp_path / "n", reference)
    path = tmp_path / "n" / "Depth" / "17.npy"
    depth = np.load(path)
    depth[5, 7] = np.nan
    np.save(path, depth)
    error = build_error("gdsr_nyuv2", tmp_path, tmp_path / "n")
    assert isinstance(error, common.CorruptDataError)
    assert f"{path}: non-finite value nan at index (5, 7)" in str(error)


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        ("exposure.txt", b"0\n2\n", "expected 3 exposures, got 2"),
        ("HDRImg.hdr", b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 2 +X", "not a readable Radiance"),
        ("262A0899.tif", b"II*\x00garbage", "expected a 16-bit RGB image"),
    ],
)
def test_corrupt_kalantari_file_is_named(tmp_path, file, content, message):
    make_kalantari(tmp_path / "k")
    path = tmp_path / "k" / "Test" / "EXTRA" / "Lake" / file
    path.write_bytes(content)
    error = build_error("hdr_kalantari", tmp_path, tmp_path / "k")
    assert isinstance(error, common.CorruptDataError)
    assert str(path) in str(error) and message in str(error)


# --- Radiance RGBE ---


def test_radiance_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.random((9, 300, 3)) * np.exp2(rng.integers(-8, 8, (9, 300, 1)))
    image[2, 10:200] = [0.25, 0.5, 1.0]  # long runs
    image[4] = 0.0
    radiance.write_hdr(tmp_path / "x.hdr", image)
    decoded = radiance.read_hdr(tmp_path / "x.hdr")
    assert decoded.dtype == np.float32 and decoded.shape == image.shape
    # 8-bit mantissas: each value is truncated to within 2^-8 of its pixel's largest channel.
    peak = image.max(axis=2, keepdims=True)
    assert (decoded <= image + 1e-12).all() and (image - decoded <= peak / 128).all()
    np.testing.assert_array_equal(decoded[2, 10:200], [[0.25, 0.5, 1.0]] * 190)
    assert (decoded[4] == 0).all()


def test_radiance_flat_scanlines(tmp_path):
    rgbe = np.array([[[128, 64, 0, 129], [255, 0, 1, 120], [0, 0, 0, 0]]], np.uint8)
    header = b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 1 +X 3\n"
    (tmp_path / "flat.hdr").write_bytes(header + rgbe.tobytes())
    decoded = radiance.read_hdr(tmp_path / "flat.hdr")
    expected = rgbe[..., :3] * np.ldexp(1.0, rgbe[..., 3:].astype(int) - 136)
    expected[0, 2] = 0
    np.testing.assert_array_equal(decoded, expected.astype(np.float32))


# --- packaging and TensorFlow ---


def test_installed_name_does_not_shadow_datasets():
    assert mgdn_datasets.__name__ == "mgdn_datasets"
    assert mgdn_datasets.MffLytro.__module__ == "mgdn_datasets.mff_lytro.mff_lytro_dataset_builder"
    assert tfds.builder_cls("mff_lytro") is mgdn_datasets.MffLytro
    imported = sys.modules.get("datasets")
    assert imported is None or Path(imported.__file__).parent != Path(mgdn_datasets.__file__).parent


def test_wheel_installs_mgdn_datasets(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "mgdn_jax", "datasets"):
        if (REPO / name).exists():
            (source / name).symlink_to(REPO / name)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    subprocess.run([*command, "-q", "-w", str(tmp_path), str(source)], check=True)
    (wheel,) = tmp_path.glob("*.whl")
    files = zipfile.ZipFile(wheel).namelist()
    assert "mgdn_datasets/hdr_kalantari/hdr_kalantari_dataset_builder.py" in files
    assert not any(name.startswith("datasets/") for name in files)
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target)]
    subprocess.run([*pip, str(wheel)], check=True)
    out = subprocess.run(
        [sys.executable, "-c", "import mgdn_datasets; print(mgdn_datasets.__file__)"],
        env={**os.environ, "PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.stdout.strip() == str(target / "mgdn_datasets" / "__init__.py"), out.stderr
