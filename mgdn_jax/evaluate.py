"""Evaluation of a model on a config's eval dataset, and the `mgdn-eval` command.

    mgdn-eval --config configs/synthetic_mff.py --weights WORKDIR/export [--samples DIR]

Metrics per image, averaged over the images of this process's share of the dataset:
- fusion (MFF / MEF) with a reference: PSNR, SSIM; with `fusion_metrics`, also the
  no-reference fusion metrics of `mgdn_jax.metrics.fusion_metrics` (EN, SD, SF, AG, MI, SCD,
  VIF, Qabf, MEF-SSIM);
- HDR: PSNR-mu, SSIM-mu, PSNR-l, SSIM-l;
- GDSR: RMSE in cm (prediction clipped to [0, 1] and de-normalised, 6-pixel border), as the
  release evaluates.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
from collections import defaultdict
from pathlib import Path

import ml_collections
import numpy as np
from PIL import Image

from mgdn_jax import input_pipeline, metrics
from mgdn_jax.errors import UserError, run_cli
from mgdn_jax.inference import jit_forward
from mgdn_jax.model import MGDN


@dataclasses.dataclass
class EvalResult:
    """metrics: name -> mean over `count` images; samples: name -> (H, W, C) uint8 image."""

    metrics: dict[str, float]
    count: int
    samples: dict[str, np.ndarray]


def to_uint8(image: np.ndarray) -> np.ndarray:
    """(H, W, C) float in [0, 1] (C = 1 or 3) -> (H, W, 3) uint8, the official rounding."""
    image = np.clip(image, 0.0, 1.0)
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return np.round(image * 255.0).astype(np.uint8)


def image_metrics(
    task: str, output: np.ndarray, batch: dict, fusion_metrics: bool
) -> dict[str, float]:
    """Metrics of one (1, H, W, C) output against its batch (see the module docstring)."""
    target = batch.get("target")
    if task == input_pipeline.HDR:
        fns = {
            "psnr_mu": metrics.psnr_mu,
            "ssim_mu": metrics.ssim_mu,
            "psnr_l": metrics.psnr_l,
            "ssim_l": metrics.ssim_l,
        }
        return {k: float(fn(output, target)[0]) for k, fn in fns.items()}
    if task == input_pipeline.GDSR:
        low, high = (batch[k][:, None, None, None] for k in ("depth_min", "depth_max"))
        pred = np.clip(output, 0.0, 1.0) * (high - low) + low
        return {"rmse_cm": float(metrics.depth_rmse_cm(pred, target * (high - low) + low)[0])}
    values = {}
    if target is not None:
        values["psnr"] = float(metrics.psnr(output, target)[0])
        values["ssim"] = float(metrics.ssim(output, target)[0])
    if fusion_metrics:
        values.update(metrics.fusion_metrics(output[0], [x[0] for x in batch["inputs"]]))
    return values


def evaluate(
    model: MGDN,
    config: ml_collections.ConfigDict,
    *,
    sample_dir: Path | None = None,
    num_samples: int = 0,
    fusion_metrics: bool = False,
) -> EvalResult:
    """One pass over this process's share of `config.data.eval_dataset`; the first
    `num_samples` outputs are returned and, with `sample_dir`, written there as NAME.png."""
    forward = jit_forward(model)
    task = input_pipeline.task_of(
        input_pipeline.load_source(
            config.data.eval_dataset, config.data.eval_split, config.data.data_dir
        ).dataset_info.features.keys()
    )
    totals: dict[str, float] = defaultdict(float)
    samples: dict[str, np.ndarray] = {}
    count = 0
    for batch in input_pipeline.create_eval_loader(config):
        output = np.asarray(forward(*batch["inputs"]))
        for key, value in image_metrics(task, output, batch, fusion_metrics).items():
            totals[key] += value
        count += 1
        if len(samples) < num_samples:
            samples[str(batch["name"][0])] = to_uint8(output[0])
    if sample_dir is not None:
        sample_dir.mkdir(parents=True, exist_ok=True)
        for name, image in samples.items():
            Image.fromarray(image).save(sample_dir / f"{name}.png")
    return EvalResult({k: v / max(count, 1) for k, v in totals.items()}, count, samples)


def load_config(spec: str) -> ml_collections.ConfigDict:
    """`path/to/config.py[:arg]` -> its `get_config(arg)`."""
    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise UserError(f"{path}: no such config file")
    module_spec = importlib.util.spec_from_file_location("mgdn_eval_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mgdn-eval", description="Evaluate MGDN weights on a config's eval dataset."
    )
    parser.add_argument("--config", required=True, help="configs/<task>.py[:arg]")
    parser.add_argument("--weights", required=True, help="WORKDIR/export or mgdn-convert output")
    parser.add_argument("--data-dir", help="TFDS data_dir (default: the config's)")
    parser.add_argument("--samples", type=Path, help="write every fused image here as PNG")
    parser.add_argument("--fusion-metrics", action="store_true", help="also EN, SF, Qabf, ...")
    args = parser.parse_args(argv)

    def run() -> None:
        from mgdn_jax.convert import load_converted

        config = load_config(args.config)
        if args.data_dir:
            config.data.data_dir = args.data_dir
        model, _ = load_converted(args.weights)
        result = evaluate(
            model,
            config,
            sample_dir=args.samples,
            num_samples=sys.maxsize if args.samples else 0,
            fusion_metrics=args.fusion_metrics,
        )
        print(json.dumps({"images": result.count, **result.metrics}, indent=2))

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
