"""Evaluation (`mgdn_jax.evaluate`, `mgdn-eval`): the official MFF weights on the 20 Lytro pairs
give the metrics of the official release's outputs; the results files and their convention;
one-line errors; evaluation during training; no TensorFlow import."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from dataset_fixtures import REPO, load_config, run_on_base_install
from flax import nnx
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from mgdn_jax import evaluate, image_io, input_pipeline, metrics, train_lib
from mgdn_jax.convert import save_converted
from mgdn_jax.model import build_model
from mgdn_jax.variants import model_config

pytest_plugins = ["dataset_fixtures"]

CONFIGS = REPO / "configs"
TOLERANCE = 1e-4  # per metric, the bound
TINY = {"embed_dim": 12, "depths": (1, 1), "num_heads": (2, 2), "window_size": 4}


def read_results(directory: Path) -> tuple[dict, list[str], list[list[str]]]:
    """(results.json, the CSV's comment line, the CSV's rows) of a results directory."""
    record = json.loads((directory / "results.json").read_text())
    with (directory / "results.csv").open(newline="") as f:
        comment = f.readline()
        rows = list(csv.reader(f))
    return record, comment, rows


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised tiny MFF model in the `mgdn-convert` format."""
    cfg = model_config("mff")
    cfg.update(TINY)
    directory = tmp_path_factory.mktemp("tiny") / "weights"
    save_converted(build_model(cfg), cfg, directory)
    return directory


def test_official_weights_on_lytro_match_official_outputs(
    lytro: Path, reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    """All 20 pairs, official padding: every metric of every image (and the means) within
    1e-4 of the same metrics computed on the official release's PNGs with the same sources."""
    rc = evaluate.main(
        [
            f"--config={CONFIGS / 'mff.py'}",
            f"--config.weights={reference / 'weights' / 'mff_62000_E.pth'}",
            "--config.eval.dataset=mff_lytro",
            f"--config.data.data_dir={lytro}",
            "--config.data.num_workers=0",
            f"--workdir={tmp_path}",
        ]
    )
    assert rc == 0
    directory = tmp_path / "eval" / "mff_lytro_test"
    record, _, _ = read_results(directory)
    names = [f"lytro_{i:02d}" for i in range(1, 21)]
    assert [row["name"] for row in record["images"]] == names
    assert record["metrics"] == list(metrics.FUSION_METRIC_NAMES)
    official = {}
    for name in names:
        sources = [image_io.read_image(reference / "lytro" / d / f"{name}.jpg") for d in "AB"]
        png = reference / "lytro_official" / f"{name}.png"
        official[name] = metrics.fusion_metrics(image_io.read_image(png), sources)
        ours = np.asarray(Image.open(directory / "outputs" / f"{name}.png"), np.int32)
        assert np.abs(ours - np.asarray(Image.open(png), np.int32)).max() <= 1, name
    worst = {
        k: max(abs(row[k] - official[row["name"]][k]) for row in record["images"])
        for k in record["metrics"]
    }
    assert max(worst.values()) <= TOLERANCE, worst
    for k in record["metrics"]:
        expected = np.mean([official[name][k] for name in names])
        assert record["mean"][k] == pytest.approx(expected, abs=TOLERANCE), k
    table = capsys.readouterr().out
    assert all(name in table for name in names) and "\nmean " in table


def test_cli_results_files_without_tensorflow(synthetic_tiny: Path, tiny_weights: Path, tmp_path):
    """`mgdn-eval` in a fresh interpreter that can import only the base dependencies (so not
    TensorFlow): the table on
    stdout, results.json / results.csv with the convention and one row per image, the outputs;
    no TensorFlow module loaded."""
    argv = [
        f"--config={CONFIGS / 'synthetic_mff.py'}",
        f"--config.weights={tiny_weights}",
        "--config.eval.dataset=synthetic_fusion/mff_tiny",
        "--config.eval.fusion_metrics=True",
        f"--config.data.data_dir={synthetic_tiny}",
        f"--workdir={tmp_path}",
    ]
    code = f"""
        from mgdn_jax import evaluate

        assert evaluate.main({argv!r}) == 0
        """
    result = run_on_base_install(code, tmp_path)

    directory = tmp_path / "eval" / "synthetic_fusion_mff_tiny_test"
    record, comment, rows = read_results(directory)
    names = ["psnr", "ssim", *metrics.FUSION_METRIC_NAMES]
    assert record["dataset"] == "synthetic_fusion/mff_tiny" and record["split"] == "test"
    assert record["weights"] == str(tiny_weights)
    assert record["count"] == 2 and record["metrics"] == names
    convention = record["convention"]
    assert convention["fusion_metrics"]["range"] == "0..255"
    assert convention["fusion_metrics"]["log_base"] == 2
    assert "0.299 R + 0.587 G + 0.114 B" in convention["fusion_metrics"]["grey"]
    assert convention["reference_metrics"]["metrics"] == ["psnr", "ssim"]
    assert convention["padding"].startswith("official")
    images = {row.pop("name"): row for row in record["images"]}
    assert len(images) == 2 and all(list(row) == names for row in images.values())
    for k in names:
        assert record["mean"][k] == pytest.approx(np.mean([row[k] for row in images.values()]))

    assert comment.startswith("# convention: ")
    assert json.loads(comment.removeprefix("# convention: ")) == convention
    assert rows[0] == ["name", *names]
    assert [row[0] for row in rows[1:]] == [*images, "mean"]
    for row in rows[1:]:
        expected = images.get(row[0], record["mean"])
        assert [float(x) for x in row[1:]] == [expected[k] for k in names]

    for name in images:
        output = np.asarray(Image.open(directory / "outputs" / f"{name}.png"))
        assert output.shape == (64, 64, 3) and output.dtype == np.uint8
        assert name in result.stdout
    assert "\nmean " in result.stdout


@pytest.mark.parametrize(
    "changes, message",
    [
        ({}, "no weights: pass --config.weights=PATH"),
        ({"--config.weights": "{tmp}/missing"}, "missing: no such file or directory"),
        ({"--config": "{tmp}/missing.py"}, "missing.py"),
        ({"--config": "{tmp}/no_get_config.py:2"}, "no_get_config.py: the file defines no get_"),
        ({"--config.eval.dataset": "no_such_set"}, "unknown dataset 'no_such_set'"),
        ({"--config.eval.dataset": "mff_lytro"}, "mff_lytro is not prepared in"),
        ({"--config.eval.split": "validation"}, "Unknown split 'validation'"),
        ({"--config.eval.pad": "zeros"}, "unknown eval.pad 'zeros'"),
        ({"--config.data.num_workers": "-3"}, "data.num_workers must be an integer >= 0, got -3"),
        ({"--config.no_such_field": "1"}, "unknown config field 'no_such_field'"),
        ({"--config.weights": "{tmp}"}, "not a converted MGDN checkpoint"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    synthetic_tiny: Path,
    tiny_weights: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    changes: dict[str, str],
    message: str,
):
    # ml_collections executes every config file into one module object, sys.modules'
    # "config_config", so in one process a file without get_config() would find an earlier one's.
    monkeypatch.delitem(sys.modules, "config_config", raising=False)
    flags = {
        "--config": str(CONFIGS / "synthetic_mff.py"),
        "--config.eval.dataset": "synthetic_fusion/mff_tiny",
        "--config.data.data_dir": str(synthetic_tiny),
        "--workdir": str(tmp_path / "work"),
        **({"--config.weights": str(tiny_weights)} if changes else {}),
        **{k: v.format(tmp=tmp_path) for k, v in changes.items()},
    }
    (tmp_path / "no_get_config.py").write_text("VALUE = 1\n")
    if changes.get("--config.eval.dataset") == "mff_lytro":
        flags["--config.data.data_dir"] = str(tmp_path / "empty")
    assert evaluate.main([f"{k}={v}" for k, v in flags.items()]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    assert message in captured.err
    assert not (tmp_path / "work").exists()


def test_rows_survive_the_gather_between_processes():
    first = [("lytro_01", [0.1, float("inf")]), ("é_2", [1 / 3, -2.5])]
    second = [("lytro_02", [7.0, 1e-300])]
    gathered = np.stack([evaluate.encode_rows(rows, 2, 2) for rows in (first, second)])
    assert evaluate.decode_rows(gathered) == first + second
    with pytest.raises(ValueError, match="longer than"):
        evaluate.encode_rows([("x" * 257, [0.0])], 1, 1)


def test_training_evaluation_writes_results(synthetic_tiny: Path, tmp_path: Path):
    config = load_config("synthetic_mff")
    config.model.update(TINY)
    config.data.update(data_dir=str(synthetic_tiny), num_workers=0)
    config.eval.update(dataset="synthetic_fusion/mff_tiny", num_samples=1)
    graphdef, params = nnx.split(build_model(config.model))
    log = train_lib.MetricLog(tmp_path)
    logged = train_lib.run_evaluation(config, graphdef, params, tmp_path, 7, log)
    record, _, rows = read_results(
        tmp_path / "eval" / "synthetic_fusion_mff_tiny_test" / "step_00000007"
    )
    assert record["step"] == 7 and record["count"] == 2 and len(rows) == 1 + 2 + 1
    assert record["metrics"] == ["psnr", "ssim"]
    assert logged == {f"eval/{k}": v for k, v in record["mean"].items()}
    assert len(list((tmp_path / "samples" / "00000007").glob("*.png"))) == 1
    assert (tmp_path / "export" / "config.json").is_file()


@pytest.mark.parametrize("task, fixture", [("hdr", "kalantari"), ("gdsr", "nyuv2")])
def test_hdr_and_gdsr_metrics(request: pytest.FixtureRequest, task: str, fixture: str):
    """The HDR and GDSR metrics of one test image equal those computed here from the network's
    output: scikit-image for HDR, NumPy for the GDSR RMSE."""
    config = load_config(task)
    stages = len(config.model.depths)
    config.model.update({**TINY, "depths": (1,) * stages, "num_heads": (2,) * stages})
    config.data.update(data_dir=str(request.getfixturevalue(fixture)), num_workers=0)
    config.eval.split = "test[:1]"
    model = build_model(config.model)
    result = evaluate.evaluate(model, config, num_samples=1)
    expected = ("psnr_mu", "ssim_mu", "psnr_l", "ssim_l") if task == "hdr" else ("rmse_cm",)
    assert result.metrics == expected and len(result.rows) == 1
    (row,) = result.rows.values()
    assert all(row[k] == result.mean[k] for k in expected)
    assert result.convention["reference_metrics"]["metrics"] == list(expected)
    # The same image through the network (small enough for the release to run it whole) and
    # the metrics computed here: scikit-image's PSNR and default SSIM, as the release's HDR
    # evaluation; the GDSR RMSE in cm of the de-normalised depths, 6-pixel border cropped.
    batch = next(iter(input_pipeline.create_eval_loader(config)))
    out = np.asarray(model(*batch["inputs"])[0], np.float64)
    target = np.asarray(batch["target"][0], np.float64)
    if task == "hdr":

        def mu(x):
            return np.log1p(5000.0 * x) / np.log(5001.0)

        want = {
            "psnr_mu": peak_signal_noise_ratio(mu(target), mu(out), data_range=1.0),
            "ssim_mu": structural_similarity(mu(target), mu(out), data_range=1.0, channel_axis=-1),
            "psnr_l": peak_signal_noise_ratio(target, out, data_range=1.0),
            "ssim_l": structural_similarity(target, out, data_range=1.0, channel_axis=-1),
        }
    else:
        low, high = float(batch["depth_min"][0]), float(batch["depth_max"][0])
        pred = np.clip(out, 0.0, 1.0) * (high - low) + low
        diff = 100.0 * (pred - (target * (high - low) + low))[6:-6, 6:-6]
        want = {"rmse_cm": np.sqrt(np.mean(diff**2))}
    assert row == pytest.approx(want, rel=1e-4)
    (sample,) = result.samples.values()
    assert sample.dtype == np.uint8 and sample.shape[-1] == 3
