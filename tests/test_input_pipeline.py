"""The grain input pipeline (`mgdn_jax.input_pipeline`) on the datasets dataset_fixtures.py builds:
batch format per task, aligned crops and orientations, determinism, process shards, resuming
from a saved iterator state, evaluation passes, and that TensorFlow is never imported."""

from __future__ import annotations

from pathlib import Path

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from dataset_fixtures import (
    KALANTARI_EV,
    load_config,
    run_on_base_install,
)
from PIL import Image

from mgdn_jax import input_pipeline
from mgdn_jax.errors import UserError

# The session fixtures (data_dir, lytro, kalantari, ...) that build every dataset once.
pytest_plugins = ["dataset_fixtures"]


def config_for(
    data_dir: Path, name: str = "synthetic_mff", eval_dataset: str | None = None, **data
) -> ml_collections.ConfigDict:
    """configs/<name>.py reading `data_dir`, in-process (no workers) unless `data` says so,
    evaluating on `eval_dataset` if given."""
    config = load_config(name)
    config.data.update({"data_dir": str(data_dir), "num_workers": 0, **data})
    if eval_dataset is not None:
        config.eval.dataset = eval_dataset
    return config


def tiny_config(data_dir: Path, **data) -> ml_collections.ConfigDict:
    defaults = dict(
        train_dataset="synthetic_fusion/mff_tiny",
        eval_dataset="synthetic_fusion/mff_tiny",
        patch_size=32,
        global_batch=4,
    )
    return config_for(data_dir, **{**defaults, **data})


def take(iterator, n: int) -> list[dict]:
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        np.testing.assert_array_equal(x["name"], y["name"])
        np.testing.assert_array_equal(x["target"], y["target"])
        for u, v in zip(x["inputs"], y["inputs"]):
            np.testing.assert_array_equal(u, v)


def test_fusion_train_batch_format(synthetic_tiny):
    batch = next(iter(input_pipeline.create_train_loader(tiny_config(synthetic_tiny))))
    assert set(batch) == {"inputs", "target", "name"}
    assert isinstance(batch["inputs"], tuple) and len(batch["inputs"]) == 2
    for array in (*batch["inputs"], batch["target"]):
        assert array.shape == (4, 32, 32, 3) and array.dtype == np.float32
        assert 0.0 <= array.min() and array.max() <= 1.0
    assert batch["name"].shape == (4,) and all(n.startswith("train_") for n in batch["name"])


def window_of(crop: np.ndarray, full: np.ndarray) -> tuple[int, int, int]:
    """The (top, left, mode) such that `crop` = orient(full[window], mode); fails if none."""
    size = crop.shape[0]
    height, width = full.shape[:2]
    for mode in input_pipeline.ORIENTATIONS[input_pipeline.FUSION]:
        for top in range(height - size + 1):
            for left in range(width - size + 1):
                window = full[top : top + size, left : left + size]
                if np.array_equal(input_pipeline.orient(window, mode), crop):
                    return top, left, mode
    raise AssertionError("crop not found in the full image")


def test_crops_and_orientations_are_aligned(synthetic_tiny):
    source = tfds.data_source("synthetic_fusion/mff_tiny", split="train", data_dir=synthetic_tiny)
    full = {example["name"].decode(): example for example in source}
    modes = set()
    iterator = iter(input_pipeline.create_train_loader(tiny_config(synthetic_tiny)))
    for batch in take(iterator, 3):
        for i, name in enumerate(batch["name"]):
            crops = [batch["target"][i], *(x[i] for x in batch["inputs"])]
            top, left, mode = window_of(np.round(crops[0] * 255), full[name]["target"])
            modes.add(mode)
            for crop, key in zip(crops[1:], ("source_1", "source_2")):
                window = full[name][key][top : top + 32, left : left + 32]
                np.testing.assert_array_equal(
                    np.round(crop * 255), input_pipeline.orient(window, mode)
                )
    assert len(modes) > 1


def test_orientations_of_each_task():
    x = np.arange(12).reshape(3, 4)
    fusion = input_pipeline.ORIENTATIONS[input_pipeline.FUSION]
    assert len({input_pipeline.orient(x, mode).tobytes() for mode in fusion}) == 8
    flips = {x.tobytes(), x[:, ::-1].tobytes(), x[::-1].tobytes(), x[::-1, ::-1].tobytes()}
    for task in (input_pipeline.HDR, input_pipeline.GDSR):  # the release's four flips
        modes = input_pipeline.ORIENTATIONS[task]
        assert {input_pipeline.orient(x, mode).tobytes() for mode in modes} == flips


def test_hdr_inputs(kalantari):
    config = config_for(kalantari, "hdr", patch_size=16, global_batch=2)
    batch = next(iter(input_pipeline.create_train_loader(config)))
    times = np.exp2(np.array(KALANTARI_EV, np.float32))
    np.testing.assert_array_equal(batch["exposure_times"], np.stack([times, times]))
    assert len(batch["inputs"]) == 3 and batch["target"].shape == (2, 16, 16, 3)
    for frame, time in zip(batch["inputs"], times):
        assert frame.shape == (2, 16, 16, 6) and frame.dtype == np.float32
        np.testing.assert_allclose(frame[..., 3:], frame[..., :3] ** 2.2 / time, rtol=1e-6)
        # The fixture's LDRs are a function of the HDR target: checks crop and orientation.
        ldr = np.clip(batch["target"] * 4 * time / 16, 0, 1) ** (1 / 2.2)
        np.testing.assert_allclose(frame[..., :3], ldr, atol=0.03)


def test_gdsr_eval_matches_official_protocol(nyuv2, reference):
    import torch

    config = config_for(nyuv2, "gdsr")
    batches = {b["name"][0]: b for b in input_pipeline.create_eval_loader(config)}
    assert sorted(batches) == ["1444", "1445", "1446", "1447", "1448"]
    batch = batches["1445"]
    depth = np.load(reference / "gdsr_samples" / "Depth" / "1445.npy")
    rgb = np.asarray(Image.open(reference / "gdsr_samples" / "RGB" / "1445.jpg"))
    np.testing.assert_array_equal(batch["depth_min"], [depth.min()])
    np.testing.assert_array_equal(batch["depth_max"], [depth.max()])
    normalised = (depth - depth.min()) / (depth.max() - depth.min())
    np.testing.assert_allclose(batch["target"][0, ..., 0], normalised, atol=1e-6)
    imagenet = (rgb / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    np.testing.assert_allclose(batch["inputs"][0][0], imagenet, atol=1e-5)
    low = np.array(Image.fromarray(normalised.astype(np.float32)).resize((160, 120), Image.BICUBIC))
    official = torch.nn.functional.interpolate(
        torch.from_numpy(low)[None, None], scale_factor=4, mode="bicubic", align_corners=False
    )[0, 0].numpy()
    assert batch["inputs"][1].shape == (1, 480, 640, 1)
    np.testing.assert_allclose(batch["inputs"][1][0, ..., 0], official, atol=1e-5)


@pytest.mark.parametrize("scale", [8, 16])
def test_gdsr_train_crops(nyuv2, scale):
    config = config_for(nyuv2, "gdsr", patch_size=32, global_batch=2, scale=scale)
    batch = next(iter(input_pipeline.create_train_loader(config)))
    rgb, depth = batch["inputs"]
    assert rgb.shape == (2, 32, 32, 3) and depth.shape == batch["target"].shape == (2, 32, 32, 1)
    assert batch["depth_min"].shape == batch["depth_max"].shape == (2,)
    assert (batch["depth_min"] < batch["depth_max"]).all()
    # Each crop is normalised by its own range (the release's training loader).
    np.testing.assert_array_equal(batch["target"].min(axis=(1, 2, 3)), [0, 0])
    np.testing.assert_allclose(batch["target"].max(axis=(1, 2, 3)), [1, 1], rtol=1e-6)


def test_gdsr_patch_must_be_a_multiple_of_the_scale(nyuv2):
    config = config_for(nyuv2, "gdsr", patch_size=36, scale=8)
    with pytest.raises(UserError, match="not a multiple of scale 8"):
        input_pipeline.create_train_loader(config)


def test_eval_pass_lytro(lytro):
    config = config_for(lytro, eval_dataset="mff_lytro")
    loader = input_pipeline.create_eval_loader(config)
    batches = list(loader)
    assert sorted(b["name"][0] for b in batches) == [f"lytro_{i:02d}" for i in range(1, 21)]
    for batch in batches:
        assert set(batch) == {"inputs", "name"}  # no reference
        assert [x.shape for x in batch["inputs"]] == [(1, 520, 520, 3)] * 2
    assert [b["name"][0] for b in loader] == [b["name"][0] for b in batches]


def test_eval_keeps_original_sizes(mef_benchmark):
    config = config_for(mef_benchmark, eval_dataset="mef_benchmark")
    sizes = {b["name"][0]: b["inputs"][0].shape for b in input_pipeline.create_eval_loader(config)}
    assert sizes["ArchSequence"] == (1, 1024, 669, 3) and sizes["Arno"] == (1, 339, 512, 3)


def test_eval_shards_cover_the_set_once(lytro):
    config = config_for(lytro, eval_dataset="mff_lytro")
    names = []
    for index in range(3):
        shard = grain.sharding.ShardOptions(index, 3)
        names += [
            b["name"][0] for b in input_pipeline.create_eval_loader(config, shard_options=shard)
        ]
    assert sorted(names) == [f"lytro_{i:02d}" for i in range(1, 21)]


def test_same_seed_same_batches_other_seed_other_batches(synthetic_tiny):
    def first(seed: int) -> list[dict]:
        loader = input_pipeline.create_train_loader(tiny_config(synthetic_tiny, seed=seed))
        return take(iter(loader), 3)

    assert_batches_equal(first(5), first(5))
    with pytest.raises(AssertionError):
        assert_batches_equal(first(5), first(6))


def test_process_shards_split_an_epoch(synthetic_tiny):
    # 8 training examples, global batch 4 over 2 processes: an epoch is 2 batches of 2 each.
    epoch = []
    for index in range(2):
        shard = grain.sharding.ShardOptions(index, 2, drop_remainder=True)
        loader = input_pipeline.create_train_loader(
            tiny_config(synthetic_tiny), shard_options=shard
        )
        batches = take(iter(loader), 2)
        assert all(b["target"].shape[0] == 2 for b in batches)
        epoch.append({str(n) for b in batches for n in b["name"]})
    assert not epoch[0] & epoch[1]
    assert len(epoch[0]) == len(epoch[1]) == 4
    source = tfds.data_source("synthetic_fusion/mff_tiny", split="train", data_dir=synthetic_tiny)
    assert epoch[0] | epoch[1] == {example["name"].decode() for example in source}


def test_global_batch_must_divide_among_processes(synthetic_tiny):
    shard = grain.sharding.ShardOptions(0, 3)
    with pytest.raises(UserError, match="not divisible by 3"):
        input_pipeline.create_train_loader(tiny_config(synthetic_tiny), shard_options=shard)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_iterator_state(synthetic_tiny, workers):
    config = tiny_config(synthetic_tiny, num_workers=workers)
    uninterrupted = iter(input_pipeline.create_train_loader(config))
    take(uninterrupted, 3)
    state = uninterrupted.get_state()
    expected = take(uninterrupted, 4)
    resumed = iter(input_pipeline.create_train_loader(config))
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 4), expected)


def test_iterator_state_in_an_orbax_checkpoint(synthetic_tiny, tmp_path):
    config = tiny_config(synthetic_tiny)
    iterator = iter(input_pipeline.create_train_loader(config))
    take(iterator, 5)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as manager:
        manager.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
        manager.wait_until_finished()
    expected = take(iterator, 2)
    resumed = iter(input_pipeline.create_train_loader(config))
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as manager:
        manager.restore(
            5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed))
        )
    assert_batches_equal(take(resumed, 2), expected)


def test_patch_larger_than_image_is_named(synthetic_tiny):
    iterator = iter(input_pipeline.create_train_loader(tiny_config(synthetic_tiny, patch_size=65)))
    with pytest.raises(ValueError, match=r"is 64x64, smaller than patch 65"):
        next(iterator)


def test_unprepared_real_dataset_says_how_to_build(tmp_path):
    config = config_for(tmp_path, "mff")
    with pytest.raises(FileNotFoundError, match="python -m mgdn_datasets.build mff_realmff"):
        input_pipeline.create_train_loader(config)


def test_synthetic_builds_on_first_use(tmp_path):
    source = input_pipeline.load_source("synthetic_fusion/mef_tiny", "test", str(tmp_path))
    assert len(source) == 2


def test_no_tensorflow_import(tmp_path):
    """Builds a manual and a generated dataset and reads them through the pipeline in a fresh
    interpreter that can import only the base dependencies (and the test helpers' pytest), so
    not TensorFlow, then checks that no TensorFlow module is loaded."""
    code = f"""
        import pathlib
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from mgdn_datasets import build
        from mgdn_jax import input_pipeline
        from dataset_fixtures import make_kalantari
        from test_input_pipeline import config_for, tiny_config

        data, manual = {str(tmp_path / "data")!r}, pathlib.Path({str(tmp_path / "manual")!r})
        make_kalantari(manual)
        build.main(["hdr_kalantari", "--data_dir", data, "--manual_dir", str(manual)])
        hdr = config_for(data, "hdr", patch_size=16, global_batch=2)
        next(iter(input_pipeline.create_train_loader(hdr)))
        next(iter(input_pipeline.create_eval_loader(hdr)))
        next(iter(input_pipeline.create_train_loader(tiny_config(data))))  # builds it first
        """
    run_on_base_install(code, tmp_path, also=("pytest",))
