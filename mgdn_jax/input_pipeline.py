"""grain input pipeline: TFDS array_record datasets (`mgdn_datasets`) -> NHWC float32 batches.

Every batch is a dict:
- `inputs`: tuple of (B, H, W, C) float32 arrays. Fusion (MFF/MEF): (source_1, source_2) RGB in
  [0, 1]. HDR: three (B, H, W, 6) frames LDR || LDR^gamma / t, t = 2^EV. GDSR: (RGB in [0, 1]
  standardised with ImageNet's mean and std (`variants.gdsr_rgb`), (B, H, W, 1) min/max-normalised
  depth downsampled by PIL bicubic and upsampled back with PyTorch's bicubic kernel), as the
  official release builds them.
- `target`: (B, H, W, C) float32 (fusion: RGB in [0, 1]; HDR: linear HDR; GDSR: normalised depth,
  C = 1); absent when the dataset has no reference.
- extras: HDR `exposure_times` (B, 3); GDSR `depth_min`, `depth_max` (B,) (metres), which undo
  the normalisation for evaluation.
- `name`: (B,) str example ids.

Training (`create_train_loader`): shuffled, repeated forever, aligned random `patch_size` crops
(GDSR depth normalised by the crop's own range, as the release does), one orientation per
example (the same on all its arrays; `ORIENTATIONS`: the release's four flips for HDR and GDSR,
all eight symmetries for fusion), batches of `global_batch / process_count` per process
(`ShardByJaxProcess`). The stream is a function of
`data.seed` and `data.num_workers`; `iter(loader)` gives a `grain.DataLoaderIterator` whose
`get_state()` / `set_state()` (or `grain.checkpoint.CheckpointSave` / `CheckpointRestore` items
in an orbax checkpoint) resume it exactly. Evaluation (`create_eval_loader`): full images in
their original sizes, batch 1, in dataset order, one pass split across processes, ending with
StopIteration.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import grain
import jax
import mgdn_datasets  # noqa: F401  (registers the builders with TFDS)
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import flags
from jax.experimental import multihost_utils
from PIL import Image

from mgdn_jax.errors import UserError
from mgdn_jax.resize import bicubic_matrix
from mgdn_jax.variants import gdsr_normalised_depth, gdsr_rgb

FUSION, HDR, GDSR = "fusion", "hdr", "gdsr"
# Training orientations (`orient` modes) per task. The release's HDR and GDSR loaders draw one of
# {identity, left-right flip, up-down flip, half turn} (GDSR as two independent flips); its
# fusion loader draws one of all eight symmetries.
ORIENTATIONS = {FUSION: tuple(range(8)), HDR: (0, 2, 4, 6), GDSR: (0, 2, 4, 6)}


def task_of(features: Iterable[str]) -> str:
    """The task whose examples have these feature names: "hdr", "gdsr" or "fusion"."""
    names = set(features)
    if "ldr" in names:
        return HDR
    if "depth" in names:
        return GDSR
    return FUSION


def load_source(name: str, split: str, data_dir: str | None = None) -> Any:
    """The random-access (TensorFlow-free) source of `name` ("dataset[/config]") / `split`.

    A dataset that needs no manual download (`synthetic_fusion`) is built on first use, by
    process 0 when there are several; the others must have been built with
    `python -m mgdn_datasets.build`.
    """
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
            raise FileNotFoundError(
                f"{name} is not prepared in {builder.data_dir}; build it with\n"
                f"  python -m mgdn_datasets.build {name} --manual_dir DIR"
                f"{f' --data_dir {data_dir}' if data_dir else ''}\n"
                f"where DIR holds:\n{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}"
            )
        if jax.process_index() == 0:
            builder.download_and_prepare()
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"mgdn_datasets prepare {name}")
            builder = tfds.builder(name, data_dir=data_dir)
    return builder.as_data_source(split=split)


def orient(x: np.ndarray, mode: int) -> np.ndarray:
    """Mode 0-7 of the dihedral group on the two leading (H, W) axes: `mode % 4` quarter turns,
    then a left-right flip if `mode >= 4`."""
    x = np.rot90(x, mode % 4)
    return np.ascontiguousarray(x[:, ::-1] if mode >= 4 else x)


def _spatial(element: dict[str, Any], task: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A decoded record -> (arrays that share H x W and are cropped together, other fields)."""
    if task == HDR:
        spatial = {f"ldr_{i}": frame for i, frame in enumerate(element["ldr"])}
        spatial["target"] = element["target"]
        return spatial, {"exposure_times": np.exp2(element["exposure_ev"]).astype(np.float32)}
    if task == GDSR:
        return {"rgb": element["rgb"], "depth": element["depth"]}, {}
    keys = ("source_1", "source_2", "target")
    return {key: element[key] for key in keys if key in element}, {}


def _crop(
    spatial: dict[str, np.ndarray],
    size: int,
    rng: np.random.Generator,
    name: str,
    modes: tuple[int, ...],
) -> dict[str, np.ndarray]:
    """One random size x size window and orientation (one of `modes`), the same for every
    array."""
    height, width = next(iter(spatial.values())).shape[:2]
    if height < size or width < size:
        raise ValueError(f"example {name!r} is {height}x{width}, smaller than patch {size}")
    top, left = rng.integers(height - size + 1), rng.integers(width - size + 1)
    mode = modes[int(rng.integers(len(modes)))]
    return {
        key: orient(value[top : top + size, left : left + size], mode)
        for key, value in spatial.items()
    }


def pil_bicubic_downsample(image: np.ndarray, scale: int) -> np.ndarray:
    """(H, W) -> (H // scale, W // scale) float32 with PIL's BICUBIC on a float ("F") image: how
    the release makes the low-resolution GDSR depth."""
    height, width = image.shape
    resized = Image.fromarray(np.asarray(image, np.float32)).resize(
        (width // scale, height // scale), Image.Resampling.BICUBIC
    )
    return np.asarray(resized, np.float32)


def torch_bicubic_upsample(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(h, w) -> (height, width) float32 as PyTorch's bicubic `F.interpolate` (a = -0.75,
    align_corners=False), the release's network input; two small matrix products."""
    rows = bicubic_matrix(image.shape[0], height)
    cols = bicubic_matrix(image.shape[1], width)
    return (rows @ image.astype(np.float64) @ cols.T).astype(np.float32)


def _to_unit(image: np.ndarray) -> np.ndarray:
    """Integer image -> float32 in [0, 1]."""
    return image.astype(np.float32) / np.float32(np.iinfo(image.dtype).max)


@dataclasses.dataclass(frozen=True)
class _Preprocess:
    """Turns a decoded record into an example of the batch format."""

    task: str
    gamma: float | None
    scale: int | None

    def finish(self, spatial: dict[str, np.ndarray], extras: dict[str, Any]) -> dict[str, Any]:
        if self.task == HDR:
            times = extras["exposure_times"]
            ldrs = [_to_unit(spatial[f"ldr_{i}"]) for i in range(len(times))]
            inputs = tuple(
                np.concatenate([ldr, ldr**self.gamma / time], axis=-1)
                for ldr, time in zip(ldrs, times)
            )
            target = spatial["target"].astype(np.float32)
        elif self.task == GDSR:
            # Normalised by its own range after cropping, as the release does.
            depth, low, high = gdsr_normalised_depth(spatial["depth"])
            extras = {"depth_min": np.float32(low), "depth_max": np.float32(high)}
            low_res = pil_bicubic_downsample(depth, self.scale)
            upsampled = torch_bicubic_upsample(low_res, *depth.shape)
            inputs = (gdsr_rgb(_to_unit(spatial["rgb"])), upsampled[..., None])
            target = depth[..., None]
        else:
            inputs = (_to_unit(spatial["source_1"]), _to_unit(spatial["source_2"]))
            target = _to_unit(spatial["target"]) if "target" in spatial else None
        out = {"inputs": inputs, **extras}
        if target is not None:
            out["target"] = target
        return out

    def __call__(
        self, element: dict[str, Any], crop: int | None, rng: np.random.Generator | None
    ) -> dict[str, Any]:
        name = element["name"].decode()
        spatial, extras = _spatial(element, self.task)
        if crop is not None:
            spatial = _crop(spatial, crop, rng, name, ORIENTATIONS[self.task])
        return {**self.finish(spatial, extras), "name": name}


@dataclasses.dataclass(frozen=True)
class TrainTransform(grain.transforms.RandomMap):
    """Random aligned crop + orientation, then task preprocessing."""

    preprocess: _Preprocess
    patch_size: int

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        return self.preprocess(element, self.patch_size, rng)


@dataclasses.dataclass(frozen=True)
class EvalTransform(grain.transforms.Map):
    """Task preprocessing of the full image."""

    preprocess: _Preprocess

    def map(self, element: dict[str, Any]) -> dict[str, Any]:
        return self.preprocess(element, None, None)


def _allow_worker_processes() -> None:
    """grain's worker pools read absl flags; outside `absl.app` they are marked parsed here so
    that they hold their defaults."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def check_counts(data: ml_collections.ConfigDict, least: int, *fields: str) -> None:
    """A one-line `UserError` unless every `data.FIELD` is an integer >= `least` (a bool is
    not a count)."""
    for field in fields:
        value = data[field]
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            bound = "a positive integer" if least == 1 else f"an integer >= {least}"
            raise UserError(f"data.{field} must be {bound}, got {value!r}")


def check_loader_config(data: ml_collections.ConfigDict) -> None:
    """`check_counts` of `data.num_workers`, `read_threads` and `prefetch_buffer` (>= 0; grain's
    own errors for them are tracebacks from inside its loader)."""
    check_counts(data, 0, "num_workers", "read_threads", "prefetch_buffer")


def _read_options(data: ml_collections.ConfigDict) -> grain.ReadOptions:
    return grain.ReadOptions(
        num_threads=data.read_threads, prefetch_buffer_size=data.prefetch_buffer
    )


def _preprocess(data: ml_collections.ConfigDict, source: Any) -> _Preprocess:
    preprocess = _Preprocess(
        task_of(source.dataset_info.features.keys()), data.get("gamma"), data.get("scale")
    )
    for task, field in ((HDR, "gamma"), (GDSR, "scale")):
        if preprocess.task == task and getattr(preprocess, field) is None:
            raise UserError(f"config.data.{field} is required for {task} datasets")
    return preprocess


def create_train_loader(
    config: ml_collections.ConfigDict, *, shard_options: grain.sharding.ShardOptions | None = None
) -> grain.DataLoader:
    """Endless shuffled, cropped, augmented batches of `config.data.train_dataset`.

    `shard_options` default to this JAX process's share (`ShardByJaxProcess`, remainder
    dropped); each process gets `global_batch / shard_count` examples per batch.
    """
    data = config.data
    shard_options = shard_options or grain.sharding.ShardByJaxProcess(drop_remainder=True)
    if data.global_batch % shard_options.shard_count:
        raise UserError(
            f"global_batch {data.global_batch} is not divisible by "
            f"{shard_options.shard_count} processes"
        )
    source = load_source(data.train_dataset, data.train_split, data.data_dir)
    preprocess = _preprocess(data, source)
    if preprocess.task == GDSR and data.patch_size % preprocess.scale:
        raise UserError(f"patch_size {data.patch_size} is not a multiple of scale {data.scale}")
    sampler = grain.samplers.IndexSampler(
        len(source), shard_options=shard_options, shuffle=True, num_epochs=None, seed=data.seed
    )
    batch = grain.transforms.Batch(
        data.global_batch // shard_options.shard_count, drop_remainder=True
    )
    if data.num_workers:
        _allow_worker_processes()
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[TrainTransform(preprocess, data.patch_size), batch],
        worker_count=data.num_workers,
        read_options=_read_options(data),
    )


def create_eval_loader(
    config: ml_collections.ConfigDict, *, shard_options: grain.sharding.ShardOptions | None = None
) -> grain.IterDataset:
    """One pass over `config.eval.split` of `config.eval.dataset` (read with the `config.data`
    settings): full-size images, batches of 1, dataset order.

    `shard_options` default to this JAX process's share (`ShardByJaxProcess`): process i of n
    gets examples i, i + n, ..., so the processes together see every example once (shares may
    differ by one).
    """
    data = config.data
    shard_options = shard_options or grain.sharding.ShardByJaxProcess()
    source = load_source(config.eval.dataset, config.eval.split, data.data_dir)
    dataset = (
        grain.MapDataset.source(source)[shard_options.shard_index :: shard_options.shard_count]
        .map(EvalTransform(_preprocess(data, source)))
        .batch(1)
        .to_iter_dataset(_read_options(data))
    )
    if not data.num_workers:
        return dataset
    _allow_worker_processes()
    return dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.num_workers))
