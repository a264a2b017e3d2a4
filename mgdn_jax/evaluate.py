"""Evaluation of MGDN weights on a config's eval split, and the `mgdn-eval` command.

    mgdn-eval --config configs/mff.py --config.weights=PATH --config.eval.dataset=mff_lytro \\
        [--workdir DIR] [--config.FIELD=VALUE ...]

Every image of `config.eval.split` of `config.eval.dataset` is fused with the padding of
`config.eval.pad` ("official": the release's inference procedure for the task, see
`inference.run`; "model": only the network's own reflect padding) and measured:
- fusion (MFF / MEF): on the output quantised to uint8 exactly as it is saved (clip to [0, 1],
  x255, round half to even). With a reference: PSNR and SSIM of that image / 255 against the
  reference. The no-reference fusion metrics of `mgdn_jax.metrics.fusion_metrics` (EN, SD, SF,
  AG, MI, SCD, VIF, Qabf, MEF-SSIM; 8-bit grey, see `metrics.FUSION_METRIC_CONVENTION`): always
  on sets without a reference, with `config.eval.fusion_metrics` on the others too;
- HDR: PSNR-mu, SSIM-mu, PSNR-l, SSIM-l of the float output;
- GDSR: RMSE in cm (prediction clipped to [0, 1] and de-normalised, 6-pixel border), as the
  release evaluates.

`mgdn-eval` prints the per-image metrics and their mean as a table and writes them, with the
metric convention, to WORKDIR/eval/<dataset>_<split>/results.json and results.csv, and (with
`config.eval.save_outputs`) every fused image to outputs/NAME.png there.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from mgdn_jax import image_io, input_pipeline, metrics, runtime
from mgdn_jax.errors import UserError, config_error, make_directory, run_cli
from mgdn_jax.inference import (
    OFFICIAL_HDR_BLOCK,
    OFFICIAL_MULTIPLE,
    PAD_MODES,
    jit_forward,
    run,
)
from mgdn_jax.model import MGDN

# Longest image name (UTF-8 bytes) that `encode_rows` carries between processes.
NAME_BYTES = 256
SSIM_DEFINITION = (
    f"{metrics.SSIM_WINDOW}x{metrics.SSIM_WINDOW} Gaussian window (sigma {metrics.SSIM_SIGMA}), "
    f"K1 {metrics.SSIM_K1}, K2 {metrics.SSIM_K2}, population statistics, only windows inside "
    "the image, mean over channels"
)
OFFICIAL_PROCEDURE = {
    input_pipeline.FUSION: f"flip padding to the next multiple of {OFFICIAL_MULTIPLE} beyond the "
    "size",
    input_pipeline.HDR: f"{OFFICIAL_HDR_BLOCK}x{OFFICIAL_HDR_BLOCK} blocks run one by one, each "
    "with the network's reflect padding",
    input_pipeline.GDSR: "the whole image, with the network's reflect padding only",
}
USAGE = """\
usage: mgdn-eval --config configs/<task>.py[:arg] --config.weights=PATH [--workdir DIR]
                 [--config.eval.dataset=NAME] [--config.FIELD=VALUE ...]

Evaluates MGDN weights (an official .pth or a directory written by mgdn-convert or training) on
the config's eval split; writes WORKDIR/eval/<dataset>_<split>/results.json, results.csv and
outputs/NAME.png. Any config field can be overridden with --config.FIELD=VALUE.
"""


@dataclasses.dataclass
class EvalResult:
    """One evaluation pass over `split` of `dataset`, all processes together.

    metrics: the metric names, in column order; rows: image name -> {metric: value}, sorted by
    name; mean: metric -> mean over the rows (NaN if none); convention: how the metrics were
    computed (`metric_convention`); samples: name -> (H, W, 3) uint8, this process's first
    outputs as saved.
    """

    dataset: str
    split: str
    metrics: tuple[str, ...]
    rows: dict[str, dict[str, float]]
    mean: dict[str, float]
    convention: dict[str, Any]
    samples: dict[str, np.ndarray]


def to_uint8(image: np.ndarray) -> np.ndarray:
    """(H, W, C) float (C = 1 or 3) -> (H, W, 3) uint8 with the official quantisation
    (`image_io.quantize_uint8`), grey replicated to RGB."""
    pixels = image_io.quantize_uint8(image)
    return np.repeat(pixels, 3, axis=-1) if pixels.shape[-1] == 1 else pixels


def metric_names(task: str, has_reference: bool, fusion_metrics: bool) -> tuple[str, ...]:
    """The metrics `image_metrics` computes, in order (see the module docstring)."""
    if task == input_pipeline.HDR:
        return ("psnr_mu", "ssim_mu", "psnr_l", "ssim_l")
    if task == input_pipeline.GDSR:
        return ("rmse_cm",)
    names = ("psnr", "ssim") if has_reference else ()
    if fusion_metrics or not has_reference:
        names += metrics.FUSION_METRIC_NAMES
    return names


def image_metrics(
    task: str, output: np.ndarray, batch: dict[str, Any], names: Sequence[str]
) -> dict[str, float]:
    """The metrics `names` of one (H, W, C) float32 output against its batch of one example."""
    target = batch.get("target")
    if task == input_pipeline.HDR:
        fns = {
            "psnr_mu": metrics.psnr_mu,
            "ssim_mu": metrics.ssim_mu,
            "psnr_l": metrics.psnr_l,
            "ssim_l": metrics.ssim_l,
        }
        return {k: float(fns[k](output, target[0])) for k in names}
    if task == input_pipeline.GDSR:
        low, high = batch["depth_min"][0], batch["depth_max"][0]
        pred = np.clip(output, 0.0, 1.0) * (high - low) + low
        return {"rmse_cm": float(metrics.depth_rmse_cm(pred, target[0] * (high - low) + low))}
    saved = image_io.quantize_uint8(output).astype(np.float32) / 255.0
    values = {}
    if "psnr" in names:
        values["psnr"] = float(metrics.psnr(saved, target[0]))
        values["ssim"] = float(metrics.ssim(saved, target[0]))
    if metrics.FUSION_METRIC_NAMES[0] in names:
        values.update(metrics.fusion_metrics(saved, [x[0] for x in batch["inputs"]]))
    return values


def metric_convention(task: str, names: Sequence[str], pad: str) -> dict[str, Any]:
    """How the metrics `names` of `task` are computed, for the results files."""
    if pad == "official":
        padding = f"official: {OFFICIAL_PROCEDURE[task]} (the release's inference script)"
    else:
        padding = "model: the network's own reflect padding to its window multiple"
    convention: dict[str, Any] = {"padding": padding}
    if task == input_pipeline.HDR:
        mu = f"{metrics.MU:g}"
        convention["output"] = "linear HDR, float32, not quantised"
        convention["reference_metrics"] = {
            "metrics": list(names),
            "psnr_mu, ssim_mu": f"of the mu-law tone-mapped images log(1 + {mu} x) / "
            f"log(1 + {mu}), data range 1",
            "psnr_l, ssim_l": "of the linear images, data range 1",
            "ssim": f"{metrics.HDR_SSIM_WINDOW}x{metrics.HDR_SSIM_WINDOW} uniform window, K1 "
            f"{metrics.SSIM_K1}, K2 {metrics.SSIM_K2}, sample statistics, only windows inside "
            "the image, mean over channels (scikit-image's defaults, as the release evaluates)",
        }
    elif task == input_pipeline.GDSR:
        convention["output"] = "min/max-normalised depth, float32, clipped to [0, 1]"
        convention["reference_metrics"] = {
            "metrics": list(names),
            "rmse_cm": "100 x RMSE of the depths in metres (output de-normalised with the "
            f"depth map's min/max), {metrics.GDSR_BORDER}-pixel border cropped",
        }
    else:
        convention["output"] = "uint8 as saved: clip to [0, 1], x 255, round half to even"
        if "psnr" in names:
            convention["reference_metrics"] = {
                "metrics": ["psnr", "ssim"],
                "images": "RGB, the saved output / 255 against the reference in [0, 1] "
                "(8-bit / 255), data range 1",
                "ssim": SSIM_DEFINITION,
            }
        if metrics.FUSION_METRIC_NAMES[0] in names:
            convention["fusion_metrics"] = {
                "metrics": list(metrics.FUSION_METRIC_NAMES),
                "images": "the saved output and the two sources, each as one 8-bit grey plane",
                **metrics.FUSION_METRIC_CONVENTION,
            }
    return convention


def encode_rows(
    rows: Sequence[tuple[str, Sequence[float]]], count: int, num_metrics: int
) -> np.ndarray:
    """(name, values) rows -> (count, NAME_BYTES + 8 num_metrics) uint8 records: the UTF-8 name,
    zero-padded, then the float64 values' bytes; records beyond len(rows) are all zero."""
    records = np.zeros((count, NAME_BYTES + 8 * num_metrics), np.uint8)
    for record, (name, values) in zip(records, rows):
        raw = name.encode()
        if not 0 < len(raw) <= NAME_BYTES:
            raise ValueError(f"image name {name!r} is empty or longer than {NAME_BYTES} bytes")
        record[: len(raw)] = np.frombuffer(raw, np.uint8)
        record[NAME_BYTES:] = np.asarray(values, np.float64).view(np.uint8)
    return records


def decode_rows(gathered: np.ndarray) -> list[tuple[str, list[float]]]:
    """(P, count, width) records of P processes (`encode_rows`) -> their (name, values) rows."""
    rows = []
    for record in gathered.reshape(-1, gathered.shape[-1]):
        name = bytes(record[:NAME_BYTES]).rstrip(b"\0").decode()
        if name:
            rows.append((name, record[NAME_BYTES:].copy().view(np.float64).tolist()))
    return rows


def gather_rows(
    rows: list[tuple[str, list[float]]], num_metrics: int
) -> list[tuple[str, list[float]]]:
    """Every process's (name, values) rows; all processes must call it."""
    if jax.process_count() == 1:
        return rows
    count = int(np.max(multihost_utils.process_allgather(np.int32(len(rows)))))
    gathered = multihost_utils.process_allgather(encode_rows(rows, count, num_metrics))
    return decode_rows(np.asarray(gathered))


def evaluate(
    model: MGDN,
    config: ml_collections.ConfigDict,
    *,
    output_dir: Path | None = None,
    num_outputs: int | None = None,
    num_samples: int = 0,
    progress: Callable[[Iterable], Iterable] = lambda batches: batches,
) -> EvalResult:
    """One pass over `config.eval.split` of `config.eval.dataset`, each process taking its
    share; every process must call it. With `output_dir`, the first `num_outputs` (None: all)
    outputs of this process are written there as NAME.png; the first `num_samples` are
    returned as `samples`."""
    ev = config.eval
    source = input_pipeline.load_source(ev.dataset, ev.split, config.data.data_dir)
    features = source.dataset_info.features.keys()
    task = input_pipeline.task_of(features)
    names = metric_names(task, "target" in features, ev.fusion_metrics)
    forward = jit_forward(model)
    rows, samples = [], {}
    written = 0
    for batch in progress(input_pipeline.create_eval_loader(config)):
        name = str(batch["name"][0])
        output = run(forward, [x[0] for x in batch["inputs"]], model.window_size, ev.pad, task)
        values = image_metrics(task, output, batch, names)
        rows.append((name, [values[k] for k in names]))
        keep = len(samples) < num_samples
        write = output_dir is not None and (num_outputs is None or written < num_outputs)
        if keep or write:
            pixels = to_uint8(output)
            if keep:
                samples[name] = pixels
            if write:
                write_png(output_dir / f"{name}.png", pixels)
                written += 1
    table = {n: dict(zip(names, v)) for n, v in sorted(gather_rows(rows, len(names)))}
    columns = {k: [row[k] for row in table.values()] for k in names}
    mean = {k: float(np.mean(v)) if v else float("nan") for k, v in columns.items()}
    convention = metric_convention(task, names, ev.pad)
    return EvalResult(ev.dataset, ev.split, names, table, mean, convention, samples)


def write_png(path: Path, pixels: np.ndarray) -> None:
    """Writes (H, W, 3) uint8 pixels as PNG, atomically, creating the directory."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    with image_io.atomic_output(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")


def results_dir(workdir: str | Path, config: ml_collections.ConfigDict) -> Path:
    """WORKDIR/eval/<dataset>_<split>, characters other than letters, digits, '.', '-' and '_'
    (e.g. the '/' of 'synthetic_fusion/mff') replaced by '_'."""
    tag = re.sub(r"[^A-Za-z0-9._-]", "_", f"{config.eval.dataset}_{config.eval.split}")
    return Path(workdir) / "eval" / tag


def write_results(result: EvalResult, directory: Path, info: dict[str, Any]) -> None:
    """Writes directory/results.json ({dataset, split, **info, count, convention, metrics, mean,
    images: [{name, **metrics}]}) and directory/results.csv (a `# convention: {json}` line,
    the header `name,<metrics>`, one row per image and a `mean` row), each atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    record = {
        "dataset": result.dataset,
        "split": result.split,
        **info,
        "count": len(result.rows),
        "convention": result.convention,
        "metrics": list(result.metrics),
        "mean": result.mean,
        "images": [{"name": name, **values} for name, values in result.rows.items()],
    }
    with image_io.atomic_output(directory / "results.json") as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    with image_io.atomic_output(directory / "results.csv") as tmp:
        with tmp.open("w", newline="") as f:
            f.write(f"# convention: {json.dumps(result.convention)}\n")
            writer = csv.writer(f)
            writer.writerow(["name", *result.metrics])
            for name, values in result.rows.items():
                writer.writerow([name, *(repr(values[k]) for k in result.metrics)])
            writer.writerow(["mean", *(repr(result.mean[k]) for k in result.metrics)])


def format_table(result: EvalResult) -> str:
    """The per-image metrics and their mean as an aligned text table."""
    lines = [(name, values) for name, values in result.rows.items()]
    lines.append(("mean", result.mean))
    first = max(len(name) for name, _ in lines)
    widths = [max(len(k), 9) for k in result.metrics]
    out = [" ".join([f"{'name':<{first}}", *(f"{k:>{w}}" for k, w in zip(result.metrics, widths))])]
    for name, values in lines:
        cells = (f"{values[k]:>{w}.4f}" for k, w in zip(result.metrics, widths))
        out.append(" ".join([f"{name:<{first}}", *cells]))
    return "\n".join(out)


# ----------------------------------------------------------------------------- mgdn-eval


def _parse(argv: list[str]) -> tuple[ml_collections.ConfigDict, Path]:
    """--config (with --config.FIELD=VALUE overrides) and --workdir -> (config, workdir)."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["mgdn-eval", *argv]
    flag_values = flags.FlagValues()
    config = config_flags.DEFINE_config_file(  # it finds the override flags in `sys_argv`
        "config", None, "configs/<task>.py[:arg]", flag_values=flag_values, sys_argv=argv
    )
    workdir = flags.DEFINE_string(
        "workdir", ".", "results go to WORKDIR/eval/<dataset>_<split>/", flag_values=flag_values
    )
    try:
        extra = flag_values(argv)[1:]
    except Exception as e:  # config_flags passes on whatever loading the config file raised
        raise config_error(e, argv) from e
    if extra:
        raise UserError(f"unexpected arguments: {' '.join(extra)}")
    if config.value is None:
        raise UserError("--config is required (configs/<task>.py)")
    return config.value, Path(workdir.value)


def check_eval_config(config: ml_collections.ConfigDict) -> Path:
    """One-line `UserError`s for a config mgdn-eval cannot run; returns the weights path."""
    if "eval" not in config or "weights" not in config:
        raise UserError("the config has no `eval` section or `weights` field")
    if config.weights is None:
        raise UserError("no weights: pass --config.weights=PATH (a .pth or converted directory)")
    weights = Path(config.weights)
    if not weights.exists():
        raise UserError(f"{weights}: no such file or directory")
    input_pipeline.check_loader_config(config.data)
    if config.eval.pad not in PAD_MODES:
        raise UserError(f"unknown eval.pad {config.eval.pad!r}; expected one of {PAD_MODES}")
    name = config.eval.dataset
    if not name:
        raise UserError("no eval dataset: pass --config.eval.dataset=NAME")
    builder = check_dataset(name, config.data.data_dir)
    if not builder.is_prepared():
        return weights  # generated on first use; its splits are known once built
    try:
        builder.info.splits[config.eval.split]
    except (KeyError, ValueError) as e:
        raise UserError(f"{name}: {str(e).splitlines()[0]}") from e
    return weights


def check_dataset(name: str, data_dir: str | None) -> Any:
    """One-line `UserError`s for a dataset that is unknown or, needing manual files, not built
    (generated ones build on first use); returns its TFDS builder."""
    import mgdn_datasets
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        known = ", ".join(getattr(mgdn_datasets, b).name for b in mgdn_datasets.__all__)
        raise UserError(f"unknown dataset {name!r}; the MGDN datasets are {known}") from e
    except ValueError as e:
        raise UserError(f"dataset {name!r}: {str(e).splitlines()[0]}") from e
    if not builder.is_prepared() and builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
        where = f" --data_dir {data_dir}" if data_dir else ""
        raise UserError(
            f"{name} is not prepared in {builder.data_dir}; build it with "
            f"`python -m mgdn_datasets.build {name} --manual_dir DIR{where}`"
        )
    return builder


def run_eval(argv: list[str], progress: Callable[[Iterable], Iterable]) -> None:
    """The body of `mgdn-eval` (see `USAGE`)."""
    from mgdn_jax.convert import load_weights

    config, workdir = _parse(argv)
    weights = check_eval_config(config)
    model = load_weights(weights, config.model.variant)
    directory = make_directory(results_dir(workdir, config))
    result = evaluate(
        model,
        config,
        output_dir=directory / "outputs" if config.eval.save_outputs else None,
        progress=progress,
    )
    write_results(result, directory, {"weights": str(weights)})
    print(f"{result.dataset} ({result.split}), {len(result.rows)} images, weights {weights}")
    print(format_table(result))
    if "fusion_metrics" in result.convention:
        print("fusion metrics: 8-bit grey 0..255 (BT.601 luma, rounded), EN / MI in bits")
    print(f"wrote {directory / 'results.json'}, {directory / 'results.csv'}")


def main(argv: list[str] | None = None) -> int:
    """`mgdn-eval`; `argv` without the program name (default: the command line, and then the
    program re-executes itself with huge pages and one malloc arena first,
    `runtime.use_huge_pages`)."""
    if argv is None:
        runtime.use_huge_pages(single_arena=True)
        argv = sys.argv[1:]
    if any(arg in ("-h", "--help", "-help") for arg in argv):
        print(USAGE, end="")
        return 0
    runtime.configure()
    from tqdm import tqdm

    def progress(batches: Iterable) -> Iterable:
        return tqdm(batches, desc="evaluating", unit="image", file=sys.stderr)

    return run_cli(lambda: run_eval(argv, progress))


if __name__ == "__main__":
    sys.exit(main())
