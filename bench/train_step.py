"""One training step of every released variant at its training patch size.

    python bench/train_step.py [--variants mff mef hdr gdsr gdsr16] [--dtypes float32 bfloat16]
        [--nmi on off] [--remat off on] [--batch 4] [--patch P] [--repeats 5]
        [--override KEY=VALUE ...] [--matmul-size N] [--in-process] [--budget-s S] [--out DIR]
        [--name train_step]

The jitted step of `mgdn_jax.train_lib.make_train_step` (forward, task loss, backward, optimizer
update) on a configuration from `configs/<task>.py` (GDSR x4, and x16 for gdsr16), with random
parameters (speed does not depend on them) and a random batch with a target (so MFF / MEF train with
their L1 reference loss). Patch size: the config's `data.patch_size` (128; GDSR 256) unless
`--patch`; batch: 4 for every variant (the issue's MFF reference, 4 x 128^2, and the release's HDR
and GDSR batch; the MFF and MEF configs train with 8) unless `--batch`. `--override` sets any config
field, e.g. `model.depths=(1,1)`. Every combination of `--dtypes` (compute dtype; parameters stay
float32), `--nmi` (on: the config's NMI redundancy loss; off: `loss.nmi_lambda=0`, the NMI not
computed at all) and `--remat` is measured, each in a child process of its own (peak RSS per
configuration) unless --in-process. Reports compile time, the median of `--repeats` steps after one
warm-up as s/step, steps/s and images/s, XLA's FLOPs per step, XLA's temporary buffers, GFLOP/s
from XLA's count and from three times the release's forward count, the larger of the two as a share
of the matmul peak in the same dtype (measured in the same run; off CPU also of the full-float32
peak; on GPUs XLA's count leaves out the cuDNN convolutions) and the peak RSS / device peak.
Combinations run in the order given with the variant innermost, so that with `--budget-s` the first
combination is measured for every variant before the budget runs out.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import common
import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mgdn_jax import runtime, train_lib
from mgdn_jax.variants import VARIANTS

SCRIPT = Path(__file__).resolve()
CONFIGS = SCRIPT.parents[1] / "configs"
# variant -> (configs/<file>.py, its get_config argument)
CONFIG_FILES = {
    "mff": ("mff", None),
    "mef": ("mef", None),
    "hdr": ("hdr", None),
    "gdsr": ("gdsr", "4"),
    "gdsr16": ("gdsr", "16"),
}
COLUMNS = [
    common.Column("variant", "variant"),
    common.Column("shape", "batch × patch"),
    common.Column("dtype", "compute"),
    common.Column("nmi", "NMI loss"),
    common.Column("remat", "remat"),
    common.Column("compile_s", "compile s", "{:.1f}"),
    common.Column("s_per_step", "s / step", "{:.3f}"),
    common.Column("steps_per_s", "steps/s", "{:.2f}"),
    common.Column("images_per_s", "images/s", "{:.1f}"),
    common.Column("xla_gflop_step", "XLA GFLOP/step", "{:.1f}"),
    common.Column("temp_mb", "XLA temp MB", "{:.0f}"),
    common.Column("xla_gflops", "GFLOP/s (XLA)", "{:.1f}"),
    common.Column("release_gflops", "GFLOP/s (3× release fwd)", "{:.1f}"),
    common.Column("peak_pct", "% peak", "{:.1f}"),
    common.Column("fp32_peak_pct", "% fp32 peak", "{:.1f}"),
    common.Column("peak_rss_mb", "peak RSS MB", "{:.0f}"),
    common.Column("run_peak_rss_mb", "run peak RSS MB", "{:.0f}"),
    common.Column("device_peak_mb", "device peak MB", "{:.0f}"),
    common.Column("status", "status"),
]


def load_config(variant: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """`configs/<task>.py`'s config for `variant`, with KEY=VALUE overrides (Python literals)."""
    name, arg = CONFIG_FILES[variant]
    spec = importlib.util.spec_from_file_location(f"configs_{name}", CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg)
    for override in overrides:
        key, _, value = override.partition("=")
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass  # a plain string
        config.update_from_flattened_dict({key: value})
    return config


def initial_state(
    config: ml_collections.ConfigDict, tx: Any, mesh: jax.sharding.Mesh
) -> tuple[Any, train_lib.TrainState]:
    """(graphdef, a replicated train state) with random parameters and every other leaf
    (step, optimizer moments, RNG) zero, built on the host: compiling the model's own
    initialisers takes minutes on a CPU."""
    graphdef, initial = train_lib.init_state(config, tx)
    abstract = jax.eval_shape(initial)
    state = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), abstract)
    state["params"] = common.random_params(abstract["params"])
    return graphdef, jax.device_put(state, NamedSharding(mesh, P()))


def random_batch(config: ml_collections.ConfigDict, batch: int, patch: int) -> dict[str, Any]:
    """{"inputs": (B, P, P, C_i) per input, "target": (B, P, P, out)} in [0, 1], on the host."""
    rng = np.random.default_rng(0)
    model = config.model
    return {
        "inputs": tuple(
            rng.random((batch, patch, patch, c), np.float32) for c in model.in_channels
        ),
        "target": rng.random((batch, patch, patch, model.out_channels), np.float32),
    }


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Compiles and times the train step of one configuration (see `configurations`)."""
    config = load_config(spec["variant"], spec["overrides"])
    config.compute_dtype = spec["dtype"]
    config.remat = spec["remat"] == "on"
    if spec["nmi"] == "off":
        config.loss.nmi_lambda = 0.0
    mesh = train_lib.create_mesh(config.mesh)
    tx, schedule = train_lib.create_optimizer(config.optimizer, config.total_steps)
    graphdef, state = initial_state(config, tx, mesh)
    batch = train_lib.device_batch(random_batch(config, spec["batch"], spec["patch"]), mesh)
    step = train_lib.make_train_step(config, graphdef, tx, schedule, mesh)
    compiled, compile_s = common.compile_timed(step, state, batch)
    memory = common.compiled_memory(compiled)  # before the state is donated
    flops = common.compiled_flops(compiled)
    carry = {"state": state}

    def one_step() -> tuple[train_lib.TrainState, dict[str, jax.Array]]:
        carry["state"], metrics = compiled(carry["state"], batch)
        return carry["state"], metrics

    timing = common.timeit(one_step, spec["repeats"])
    _, metrics = one_step()
    return {
        "compile_s": compile_s,
        "s_per_step": timing.median,
        "times": list(timing.times),
        "loss": float(metrics["loss"]),
        "xla_gflop_step": flops / 1e9,
        **memory,
        **common.peak_memory(),
        "status": "ok",
    }


def derived(row: dict[str, Any], peaks: dict[str, float]) -> dict[str, Any]:
    """Steps/s, images/s, GFLOP/s and its shares of the matmul peaks, and the batch x patch
    label. GFLOP/s counts the larger of XLA's FLOPs and three times the release's forward FLOPs
    (forward + backward ~ 3 forward passes; not with `model.*` overrides): XLA's cost analysis
    leaves out the convolutions that run as cuDNN custom calls on GPUs."""
    out = {"shape": f"{row['batch']} × {row['patch']}²"}
    if row.get("s_per_step"):
        seconds = row["s_per_step"]
        out["steps_per_s"] = 1 / seconds
        out["images_per_s"] = row["batch"] / seconds
        out["xla_gflops"] = row["xla_gflop_step"] / seconds
        gflops = out["xla_gflops"]
        per_pixel = common.RELEASE_MFLOP_PER_PIXEL.get(row["variant"])
        if per_pixel and not any(o.startswith("model.") for o in row["overrides"]):
            out["release_gflops"] = 3 * per_pixel * row["batch"] * row["patch"] ** 2 / 1e3 / seconds
            gflops = max(gflops, out["release_gflops"])
        out.update(common.peak_shares(gflops, row["dtype"], peaks))
    return out


def markdown(payload: dict[str, Any]) -> str:
    """The results table as Markdown."""
    settings = payload["settings"]
    isolation = (
        "cumulative over the whole run (--in-process)"
        if settings["in_process"]
        else "of a child process running that configuration alone"
    )
    overrides = ", ".join(settings["override"]) or "none"
    return "\n\n".join(
        [
            "### Training step",
            common.machine_line(payload["machine"])
            + " `make_train_step` (forward, loss, backward, the config's optimizer update and "
            f"weight average), median of {settings['repeats']} steps after one warm-up; "
            "images/s = batch / (s / step). "
            "Compute dtype as listed, parameters float32. NMI loss off = `loss.nmi_lambda=0` "
            "(not computed). XLA GFLOP/step: `cost_analysis()` of the compiled step (on GPUs "
            "without the cuDNN convolutions); 3× release fwd: three times the release's forward "
            "FLOPs (ARCHITECTURE.md); shares of the peaks use the larger of the two; "
            + common.peaks_line(payload["matmul"])
            + " (% peak: against the row's dtype at the default precision; % fp32 peak: "
            f"against float32 at the highest precision). Peak RSS / device peak: {isolation}; "
            "peak RSS includes compilation, run peak RSS is the peak while the compiled program "
            "runs (after the compiler's freed memory is returned, as `train.py` does). "
            f"Config overrides: {overrides}.",
            common.markdown_table(payload["rows"], COLUMNS),
        ]
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument(
        "--dtypes", nargs="+", choices=list(common.DTYPES), default=list(common.DTYPES)
    )
    parser.add_argument("--nmi", nargs="+", choices=["on", "off"], default=["on", "off"])
    parser.add_argument("--remat", nargs="+", choices=["off", "on"], default=["off", "on"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--patch", type=int, help="default: the config's data.patch_size")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--override", nargs="*", default=[], help="config KEY=VALUE")
    common.add_benchmark_args(parser, "train_step")
    return parser.parse_args(argv)


def configurations(opts: argparse.Namespace) -> list[dict[str, Any]]:
    """One spec per (dtype, nmi, remat, variant), in that nesting order; the patch size is
    --patch or the variant's config's."""
    patches = {
        v: opts.patch or load_config(v, opts.override).data.patch_size for v in opts.variants
    }
    return [
        {
            "variant": v,
            "dtype": d,
            "nmi": n,
            "remat": r,
            "batch": opts.batch,
            "patch": patches[v],
            "repeats": opts.repeats,
            "overrides": list(opts.override),
        }
        for d, n, r, v in itertools.product(opts.dtypes, opts.nmi, opts.remat, opts.variants)
    ]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark; prints and (with --out) writes the table; returns the payload."""
    return common.run_benchmark(
        SCRIPT, parse_args(argv), measure, configurations, derived, COLUMNS, markdown
    )


if __name__ == "__main__":
    runtime.use_huge_pages()  # as train.py does
    common.setup()
    main()
