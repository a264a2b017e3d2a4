"""Synthetic multi-focus and multi-exposure fusion, generated from the natural images bundled
with scikit-image: the embedded default dataset, needing no download.

`mff`: the sharp crop is the target; a smooth random focus mask splits it into two regions and
each source blurs (Gaussian or disk defocus) the region the other keeps sharp.
`mef`: the crop is the target; each source re-exposes it in linear light (darker for
`source_1`, brighter for `source_2`), adds signal-dependent sensor noise, clips, and applies a
gamma camera response. Every example is a deterministic function of (config seed, split,
index).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from mgdn_datasets import common
from PIL import Image
from scipy import ndimage
from skimage import data


@dataclasses.dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
    """`task`: "mff" or "mef"; `size`: side of the square examples; examples per split."""

    task: str = "mff"
    size: int = 128
    num_train: int = 96
    num_test: int = 8
    seed: int = 0


SPLIT_IDS = {"train": 0, "test": 1}


def _source_images() -> list[tuple[str, np.ndarray]]:
    """The natural photographs shipped inside scikit-image, as (name, (H, W, 3) uint8)."""
    left, right, _ = data.stereo_motorcycle()
    images = {
        "astronaut": data.astronaut(),
        "chelsea": data.chelsea(),
        "coffee": data.coffee(),
        "rocket": data.rocket(),
        "motorcycle_left": left,
        "motorcycle_right": right,
        "camera": data.camera(),
        "brick": data.brick(),
        "grass": data.grass(),
        "gravel": data.gravel(),
    }
    return [
        (name, np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image)
        for name, image in images.items()
    ]


class Builder(common.ArrayRecordBuilder):
    """`synthetic_fusion`: `source_1`, `source_2`, `target` (RGB uint8), `name`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        SyntheticConfig(name="mff", task="mff", description="Synthetic multi-focus pairs."),
        SyntheticConfig(name="mef", task="mef", description="Synthetic exposure pairs."),
        SyntheticConfig(
            name="mff_tiny", task="mff", size=64, num_train=8, num_test=2, description="Smoke test."
        ),
        SyntheticConfig(
            name="mef_tiny", task="mef", size=64, num_train=8, num_test=2, description="Smoke test."
        ),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__, features=common.fusion_features(target=True)
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        del dl_manager
        config = self.builder_config
        counts = {"train": config.num_train, "test": config.num_test}
        sources = _source_images()
        return {
            split: self._generate_examples(split, count, sources) for split, count in counts.items()
        }

    def _generate_examples(
        self, split: str, count: int, sources: list[tuple[str, np.ndarray]]
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        config = self.builder_config
        simulate = SIMULATORS[config.task]
        for index in range(count):
            rng = np.random.default_rng([config.seed, SPLIT_IDS[split], index])
            source_name, image = sources[index % len(sources)]
            crop = random_crop(image, config.size, rng)
            source_1, source_2 = simulate(crop.astype(np.float64) / 255.0, rng)
            name = f"{split}_{index:04d}_{source_name}"
            yield (
                name,
                {
                    "source_1": common.png_bytes(_to_uint8(source_1)),
                    "source_2": common.png_bytes(_to_uint8(source_2)),
                    "target": common.png_bytes(crop),
                    "name": name,
                },
            )


def random_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A (size, size, 3) crop of `image` after a random downscale (to at least `size`)."""
    height, width = image.shape[:2]
    smallest = size / min(height, width)
    scale = rng.uniform(max(smallest, 0.3), 1.0) if smallest < 1.0 else smallest
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC))
    top, left = rng.integers(new_h - size + 1), rng.integers(new_w - size + 1)
    return resized[top : top + size, left : left + size]


def focus_mask(size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size) in [0, 1]: two smooth random regions (covering 30-70 % each) with a soft
    boundary."""
    cells = int(rng.integers(2, 6))
    coarse = Image.fromarray(rng.standard_normal((cells, cells)).astype(np.float32))
    field = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC))
    region = (field > np.quantile(field, rng.uniform(0.3, 0.7))).astype(np.float64)
    return np.clip(ndimage.gaussian_filter(region, rng.uniform(1.0, 3.0)), 0.0, 1.0)


def defocus(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) -> the same image under a random Gaussian (sigma 1.5-4) or disk (radius 2-6)
    defocus blur."""
    if rng.random() < 0.5:
        sigma = rng.uniform(1.5, 4.0)
        return ndimage.gaussian_filter(image, (sigma, sigma, 0), mode="reflect")
    radius = rng.uniform(2.0, 6.0)
    r = int(np.ceil(radius))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    disk = (yy**2 + xx**2 <= radius**2).astype(np.float64)
    return ndimage.convolve(image, (disk / disk.sum())[..., None], mode="reflect")


def simulate_mff(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Sharp (H, W, 3) in [0, 1] -> two sources, each sharp where the other is blurred."""
    mask = focus_mask(image.shape[0], rng)[..., None]
    blurred = defocus(image, rng)
    return mask * image + (1 - mask) * blurred, (1 - mask) * image + mask * blurred


def simulate_mef(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Well-exposed (H, W, 3) in [0, 1] -> (under-, over-exposed) captures of it."""
    linear = image**2.2
    gamma = rng.uniform(1.8, 2.6)
    shot, read = rng.uniform(2e-4, 2e-3), rng.uniform(1e-3, 4e-3)

    def capture(stops: float) -> np.ndarray:
        signal = linear * 2.0**stops
        noisy = signal + rng.standard_normal(signal.shape) * np.sqrt(shot * signal + read**2)
        return np.clip(noisy, 0.0, 1.0) ** (1.0 / gamma)

    return capture(rng.uniform(-3.5, -1.5)), capture(rng.uniform(1.5, 3.5))


SIMULATORS: dict[
    str, Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]
] = {
    "mff": simulate_mff,
    "mef": simulate_mef,
}


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
