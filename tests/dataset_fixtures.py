"""Tiny dataset fixtures shared by test_datasets.py and test_input_pipeline.py (loaded with
`pytest_plugins`): the reference Lytro / MEF / NYU v2 samples, generated files in the exact
Kalantari, SICE and RealMFF layouts, and session fixtures that build each dataset once, the
`tfds build` way, into one data_dir; also a runner for code that must work on a base install
(no extras, so no TensorFlow), and a loader of configs/<name>.py."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_collections
import numpy as np
import pytest
import tifffile
from mgdn_datasets import build
from packaging.requirements import Requirement
from PIL import Image

from mgdn_jax import radiance

REPO = Path(__file__).resolve().parents[1]


def load_config(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of configs/<name>.py."""
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def base_distributions(root: str = "mgdn-jax") -> set[str]:
    """The installed distributions that `pip install ROOT` (no extras) brings: ROOT and, from
    the installed metadata, its requirements without an `extra` marker, recursively."""
    seen: set[str] = set()
    todo = [root]
    while todo:
        name = _canonical(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requirements = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in requirements:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return seen


def outside_base_install(also: tuple[str, ...] = ()) -> list[str]:
    """Top-level modules of installed distributions that a base install (with the
    distributions `also` and their requirements) would not have: the extras' TensorFlow and
    tensorboard, torch, pytest, ..."""
    base = set().union(base_distributions(), *map(base_distributions, also))
    return sorted(
        module
        for module, dists in importlib.metadata.packages_distributions().items()
        if not any(_canonical(d) in base for d in dists)
    )


# Makes importing any of BLOCKED fail in the interpreter it starts, as on a base install.
_BLOCK = """
import importlib.abc, importlib.machinery, sys

class Blocked(importlib.abc.Loader):
    def create_module(self, spec):
        raise ModuleNotFoundError(spec.name + " is not a base dependency (blocked in this test)")

    def exec_module(self, module):
        pass

class OutsideBaseInstall(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return importlib.machinery.ModuleSpec(name, Blocked())

sys.meta_path.insert(0, OutsideBaseInstall())
"""


def run_on_base_install(
    code: str, cwd: Path, also: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """Runs `code` (Python source, dedented here) in a fresh interpreter in which importing a
    module that `pip install mgdn-jax` would not install fails (TensorFlow among them), except
    those of the distributions `also` (e.g. "pytest", for code that imports the test modules);
    asserts that it exits with 0 and that no TensorFlow module was loaded."""
    blocked = f"BLOCKED = {set(outside_base_install(also))!r}\n"
    check = 'loaded = sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow")\n'
    check += 'print("TENSORFLOW MODULES:", loaded)\n'
    script = blocked + _BLOCK + textwrap.dedent(code) + "\n" + check
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "TENSORFLOW MODULES: []" in result.stdout
    return result


# Generated fixtures: (H, W) of every image.
KALANTARI_SIZE = (24, 40)
KALANTARI_SCENES = {"Training": ["001", "002", "003"], "Test": ["PAPER/Barbeque", "EXTRA/Lake"]}
KALANTARI_EV = (0.0, 2.0, 4.0)
SICE_SIZE = (40, 56)
SICE_PARTS = {"Dataset_Part1": ["1", "2", "3"], "Dataset_Part2": ["7", "8"]}
SICE_GAINS = (0.2, 0.6, 1.0, 1.6)  # frame brightness in file order 1..4
REALMFF_SIZE = (48, 64)
REALMFF_SPLITS = {"train": ["p01", "p02", "p03", "p04"], "test": ["q01", "q02"]}
NYU_TRAIN_IDS = (3, 17, 998, 999)  # generated, 48x64; the test frames come from the reference
NYU_TRAIN_SIZE = (48, 64)


def prepare(name: str, data_dir: Path, manual_dir: Path | None = None) -> None:
    """What `tfds build` does, through `python -m mgdn_datasets.build`."""
    argv = [name, "--data_dir", str(data_dir)]
    if manual_dir is not None:
        argv += ["--manual_dir", str(manual_dir)]
    build.build(argv)


def texture(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A smooth random (H, W, 3) float image in [0, 1]."""
    coarse = rng.random((4, 4, 3))
    rows = np.linspace(0, 3, size[0])
    cols = np.linspace(0, 3, size[1])
    r0 = np.minimum(rows.astype(int), 2)
    c0 = np.minimum(cols.astype(int), 2)
    fr, fc = (rows - r0)[:, None, None], (cols - c0)[None, :, None]
    top = coarse[r0][:, c0] * (1 - fc) + coarse[r0][:, c0 + 1] * fc
    bottom = coarse[r0 + 1][:, c0] * (1 - fc) + coarse[r0 + 1][:, c0 + 1] * fc
    return np.clip(top * (1 - fr) + bottom * fr + rng.normal(0, 0.02, (*size, 3)), 0, 1)


def save_rgb(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(image * 255).astype(np.uint8)).save(path)


def make_kalantari(root: Path) -> None:
    """Kalantari's layout: <split>/<scene>/{3 x *.tif (16-bit), exposure.txt, HDRImg.hdr}."""
    rng = np.random.default_rng(1)
    for split, scenes in KALANTARI_SCENES.items():
        for scene in scenes:
            directory = root / split / scene
            directory.mkdir(parents=True)
            radiance_map = texture(rng, KALANTARI_SIZE) * 4.0
            for index, ev in enumerate(KALANTARI_EV):
                ldr = np.clip(radiance_map * 2.0**ev / 16.0, 0, 1) ** (1 / 2.2)
                frame = np.round(ldr * 65535).astype(np.uint16)
                tifffile.imwrite(directory / f"262A{898 + index:04d}.tif", frame)
            (directory / "exposure.txt").write_text("".join(f"{ev}\n" for ev in KALANTARI_EV))
            radiance.write_hdr(directory / "HDRImg.hdr", radiance_map / 4.0)


def make_sice(root: Path) -> None:
    """SICE's layout: Dataset_PartN/<seq>/<k>.JPG exposures and Dataset_PartN/Label/<seq>.JPG."""
    rng = np.random.default_rng(2)
    for part, sequences in SICE_PARTS.items():
        for seq in sequences:
            scene = texture(rng, SICE_SIZE)
            for k, gain in enumerate(SICE_GAINS, start=1):
                save_rgb(root / part / seq / f"{k}.JPG", np.clip(scene * gain, 0, 1))
            save_rgb(root / part / "Label" / f"{seq}.JPG", scene)


def make_realmff(root: Path) -> None:
    """train|test/{A,B,GT}/NAME.png."""
    rng = np.random.default_rng(3)
    for split, names in REALMFF_SPLITS.items():
        for name in names:
            sharp = texture(rng, REALMFF_SIZE)
            blurred = (sharp + np.roll(sharp, 1, 0) + np.roll(sharp, 1, 1)) / 3
            half = np.arange(REALMFF_SIZE[1]) < REALMFF_SIZE[1] // 2
            mask = np.broadcast_to(half[None, :, None], sharp.shape)
            save_rgb(root / split / "A" / f"{name}.png", np.where(mask, sharp, blurred))
            save_rgb(root / split / "B" / f"{name}.png", np.where(mask, blurred, sharp))
            save_rgb(root / split / "GT" / f"{name}.png", sharp)


def make_nyuv2(root: Path, reference: Path) -> None:
    """RGB/<id>.jpg + Depth/<id>.npy: the reference test frames (linked) and generated training
    frames."""
    (root / "RGB").mkdir(parents=True)
    (root / "Depth").mkdir()
    for rgb in sorted((reference / "gdsr_samples" / "RGB").glob("*.jpg")):
        (root / "RGB" / rgb.name).symlink_to(rgb)
        depth = reference / "gdsr_samples" / "Depth" / f"{rgb.stem}.npy"
        (root / "Depth" / depth.name).symlink_to(depth)
    rng = np.random.default_rng(4)
    for frame in NYU_TRAIN_IDS:
        save_rgb(root / "RGB" / f"{frame}.jpg", texture(rng, NYU_TRAIN_SIZE))
        depth = 0.5 + 5 * texture(rng, NYU_TRAIN_SIZE)[..., 0]
        np.save(root / "Depth" / f"{frame}.npy", depth.astype(np.float32))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One TFDS data_dir shared by the session."""
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="session")
def manual_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("manual")


@pytest.fixture(scope="session")
def synthetic_tiny(data_dir: Path) -> Path:
    for config in ("mff_tiny", "mef_tiny"):
        prepare(f"synthetic_fusion/{config}", data_dir)
    return data_dir


@pytest.fixture(scope="session")
def lytro(reference: Path, data_dir: Path) -> Path:
    prepare("mff_lytro", data_dir, reference / "lytro")
    return data_dir


@pytest.fixture(scope="session")
def mef_benchmark(reference: Path, data_dir: Path) -> Path:
    prepare("mef_benchmark", data_dir, reference / "mef_samples")
    return data_dir


@pytest.fixture(scope="session")
def nyuv2(reference: Path, data_dir: Path, manual_root: Path) -> Path:
    make_nyuv2(manual_root / "nyuv2", reference)
    prepare("gdsr_nyuv2", data_dir, manual_root / "nyuv2")
    return data_dir


@pytest.fixture(scope="session")
def kalantari(data_dir: Path, manual_root: Path) -> Path:
    make_kalantari(manual_root / "kalantari")
    prepare("hdr_kalantari", data_dir, manual_root / "kalantari")
    return data_dir


@pytest.fixture(scope="session")
def sice(data_dir: Path, manual_root: Path) -> Path:
    make_sice(manual_root / "sice")
    prepare("mef_sice", data_dir, manual_root / "sice")
    return data_dir


@pytest.fixture(scope="session")
def realmff(data_dir: Path, manual_root: Path) -> Path:
    make_realmff(manual_root / "realmff")
    prepare("mff_realmff", data_dir, manual_root / "realmff")  # every config
    return data_dir
