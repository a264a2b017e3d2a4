"""The benchmark scripts at their smallest settings, and every filter formulation against the
unfold reference."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mgdn_jax.dynamic_filter import (
    FORMULATIONS,
    default_formulation,
    dynamic_filter,
    dynamic_filter_unfold,
)
from mgdn_jax.losses import JOINT_COUNTS, default_joint_counts

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def bench():
    """A loader of bench/NAME.py as the module bench_NAME (with bench/ on sys.path for the
    scripts' `import common`)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCH))

        def load(name: str) -> ModuleType:
            spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            patch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
            spec.loader.exec_module(module)
            return module

        yield load


def random_inputs(shape, k, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape), rng.standard_normal((*shape[:3], k * k))


@pytest.mark.parametrize("name", FORMULATIONS)
def test_formulation_matches_unfold(name):
    """Forward on a 7x7 window, and the gradients of x and taps on a 3x3 one (whose
    gradients compile much faster), in float64."""
    fn = FORMULATIONS[name]
    with jax.enable_x64(True):
        x, taps = random_inputs((2, 9, 10, 6), 7)
        np.testing.assert_allclose(
            fn(x, taps), dynamic_filter_unfold(x, taps), rtol=1e-12, atol=1e-12
        )
        x, taps = random_inputs((1, 5, 6, 4), 3, seed=1)
        weights = np.random.default_rng(2).standard_normal(x.shape)

        def grads(f):
            def loss(a, b):
                return jnp.sum(f(a, b, kernel_size=3) * weights)

            return jax.grad(loss, argnums=(0, 1))(x, taps)

        for ours, reference in zip(grads(fn), grads(dynamic_filter_unfold)):
            np.testing.assert_allclose(ours, reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("platform", ["cpu", "cuda", "rocm", "tpu"])
def test_model_path_runs_the_default_formulation(platform):
    """`dynamic_filter` exported for `platform` (no such device needed), at a small input, MFF's
    padded 520^2 and 1024^2 (abstract): it runs channels-first (the only formulation with
    transposes) exactly where `default_formulation` names it, which on CUDA is the small input
    only."""
    chosen = []
    for size in (16, 528, 1024):
        shape = (1, size, size, 30)
        x = jax.ShapeDtypeStruct(shape, jnp.float32)
        taps = jax.ShapeDtypeStruct((*shape[:3], 49), jnp.float32)
        program = jax.export.export(dynamic_filter, platforms=(platform,))(x, taps).mlir_module()
        name = default_formulation(platform, shape)
        assert name in FORMULATIONS
        assert ("transpose" in program) == (name == "channels_first"), (platform, size)
        chosen.append(name)
    expected = ["channels_first" if platform == "cuda" else "shifted"] + ["shifted"] * 2
    assert chosen == expected


def test_exported_model_path_runs_on_each_platform():
    """One program exported for CUDA and CPU holds both forward passes (the CUDA one's
    transposes) and, called on this CPU, gives the unfold reference's result."""
    x, taps = (jnp.asarray(a, jnp.float32) for a in random_inputs((1, 8, 9, 6), 7))
    exported = jax.export.export(dynamic_filter, platforms=("cuda", "cpu"))(x, taps)
    assert "transpose" in exported.mlir_module()
    np.testing.assert_allclose(
        exported.call(x, taps), dynamic_filter_unfold(x, taps), rtol=1e-5, atol=1e-5
    )


def read_json(path: Path) -> dict:
    payload = json.loads(path.read_text())
    assert payload["machine"]["backend"] == jax.default_backend()
    assert path.with_suffix(".md").read_text().startswith("### ")
    return payload


def positive(row: dict, *keys: str) -> None:
    for key in keys:
        assert math.isfinite(row[key]) and row[key] > 0, (key, row)


def test_filter_bench(bench, tmp_path):
    filter_bench = bench("filter")
    args = ["--sizes", "16", "--widths", "6", "--kernel-size", "3", "--repeats", "1"]
    filter_bench.main([*args, "--out", str(tmp_path)])
    payload = read_json(tmp_path / "filter.json")
    rows = payload["rows"]
    assert {(r["mode"], r["formulation"]) for r in rows} == {
        (mode, name) for mode in ("forward", "backward") for name in FORMULATIONS
    }
    for row in rows:
        assert row["status"] == "ok"
        positive(row, "median_s", "gflops", "compile_s")
        assert row["temp_mb"] >= 0
    assert len(payload["summary"]) == 2
    for s in payload["summary"]:
        assert s["default"] == default_formulation(
            jax.export.default_export_platform(), (1, 16, 16, 6)
        )
        assert s["best_other"] != s["default"]
    skipped = filter_bench.main(
        [*args, "--formulations", "unfold", "--modes", "forward", "--max-gb", "0"]
    )
    assert [r["status"] for r in skipped["rows"]] == ["skipped (memory)"]


def test_nmi_bench(bench, tmp_path):
    nmi_bench = bench("nmi")
    args = ["--sizes", "8", "--widths", "2", "--batch", "1", "--bins", "8", "--repeats", "1"]
    nmi_bench.main([*args, "--out", str(tmp_path)])
    payload = read_json(tmp_path / "nmi.json")
    rows = payload["rows"]
    assert {(r["mode"], r["formulation"]) for r in rows} == {
        (mode, name) for mode in ("forward", "backward") for name in JOINT_COUNTS
    }
    for row in rows:
        assert row["status"] == "ok"
        positive(row, "median_s", "compile_s")
        assert row["default"] == (row["formulation"] == default_joint_counts("cpu"))
    assert [(s["mode"], s["default"]) for s in payload["summary"]] == [
        ("forward", "scattered"),
        ("backward", "scattered"),
    ]
    for s in payload["summary"]:
        assert s["best_other"] == "dense"
        assert s["slowdown_pct"] == pytest.approx(100 * (s["default_ms"] / s["best_other_ms"] - 1))
    spent = nmi_bench.main([*args, "--modes", "forward", "--budget-s", "0"])
    assert {r["status"] for r in spent["rows"]} == {"skipped (time budget)"}
    assert spent["summary"] == []


def test_filter_time_prediction(bench):
    filter_bench = bench("filter")
    rows = [
        {"formulation": "loop", "mode": "forward", "width": 30, "size": 64, "median_s": 1.0},
        {"formulation": "loop", "mode": "forward", "width": 30, "size": 128, "median_s": 2.0},
        {"formulation": "loop", "mode": "forward", "width": 60, "size": 256, "median_s": 9.0},
    ]
    assert filter_bench.predicted_seconds(rows, ("loop", "forward", 30), 256) == 8.0
    assert filter_bench.predicted_seconds(rows, ("shifted", "forward", 30), 256) == 0.0


def test_model_bench(bench, tmp_path):
    model_bench = bench("model")
    model_bench.main(
        [
            *("--variants", "mff", "--sizes", "32", "--hdr-sizes", "--repeats", "1"),
            *("--matmul-size", "256", "--in-process", "--out", str(tmp_path)),
        ]
    )
    payload = read_json(tmp_path / "model.json")
    peaks = payload["matmul"]["matmul_gflops"]
    positive(peaks, "float32")
    (row,) = payload["rows"]
    assert (row["variant"], row["size"], row["dtype"], row["status"]) == (
        "mff",
        [32, 32],
        "float32",
        "ok",
    )
    positive(row, "compile_s", "median_s", "xla_mflop_px", "release_gflops", "xla_gflops")
    positive(row, "release_peak_pct", "xla_peak_pct", "temp_mb", "peak_rss_mb", "run_peak_rss_mb")
    assert row["run_peak_rss_mb"] <= row["peak_rss_mb"]
    assert row["release_mflop_px"] == 0.39
    assert row["xla_peak_pct"] == pytest.approx(100 * row["xla_gflops"] / peaks["float32"])


def test_model_bench_child_process(bench, tmp_path):
    """The default isolation: here only the matmul peak runs, in a child process."""
    payload = bench("model").main(
        ["--variants", "--matmul-size", "128", "--dtypes", "float32", "bfloat16"]
    )
    assert payload["machine"]["backend"] == jax.default_backend()
    assert payload["matmul"]["matmul_size"] == 128
    positive(payload["matmul"]["matmul_gflops"], "float32", "bfloat16")
    assert payload["rows"] == []


def test_model_bench_configurations(bench):
    model_bench = bench("model")
    opts = model_bench.parse_args(["--variants", "mff", "hdr", "--sizes", "256", "64x96"])
    assert [(c["variant"], c["size"]) for c in model_bench.configurations(opts)] == [
        ("mff", [256, 256]),
        ("hdr", [256, 256]),
        ("mff", [64, 96]),
        ("hdr", [64, 96]),
        ("hdr", [1000, 1500]),
    ]
    opts = model_bench.parse_args(
        ["--variants", "hdr", "--sizes", "--dtypes", "float32", "bfloat16"]
    )
    assert [(c["size"], c["dtype"]) for c in model_bench.configurations(opts)] == [
        ([1000, 1500], "float32"),
        ([1000, 1500], "bfloat16"),
    ]


def test_train_step_bench(bench, tmp_path):
    bench("train_step").main(
        [
            *("--variants", "mff", "--dtypes", "float32", "--nmi", "off", "--remat", "off"),
            *("--batch", "1", "--patch", "16", "--repeats", "1", "--in-process"),
            *("--matmul-size", "256"),
            *("--override", "model.embed_dim=12", "model.depths=(1,1)", "--out", str(tmp_path)),
        ]
    )
    payload = read_json(tmp_path / "train_step.json")
    (row,) = payload["rows"]
    assert (row["variant"], row["batch"], row["patch"], row["status"]) == ("mff", 1, 16, "ok")
    positive(row, "compile_s", "s_per_step", "steps_per_s", "images_per_s", "xla_gflop_step")
    positive(row, "loss", "temp_mb", "peak_rss_mb", "run_peak_rss_mb", "xla_gflops", "peak_pct")
    peak = payload["matmul"]["matmul_gflops"]["float32"]
    assert row["peak_pct"] == pytest.approx(100 * row["xla_gflops"] / peak)


def test_train_step_configurations(bench):
    train_bench = bench("train_step")
    config = train_bench.load_config("gdsr16", ["model.depths=(1,1)", "data.patch_size=64"])
    assert (config.model.embed_dim, config.model.depths, config.data.scale) == (60, (1, 1), 16)
    opts = train_bench.parse_args(["--variants", "mff", "gdsr", "--nmi", "off"])
    specs = train_bench.configurations(opts)
    assert len(specs) == 2 * 2 * 2
    assert [(s["variant"], s["patch"]) for s in specs[:2]] == [("mff", 128), ("gdsr", 256)]
    assert {s["batch"] for s in specs} == {4}


def test_random_params_and_sizes(bench):
    common = bench("common")
    abstract = {"conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 4, 8), jnp.float32)}}
    abstract["conv"]["bias"] = jax.ShapeDtypeStruct((8,), jnp.float32)
    abstract["norm"] = {"scale": jax.ShapeDtypeStruct((8,), jnp.float32)}
    params = common.random_params(abstract, "bfloat16")
    assert params["conv"]["kernel"].dtype == jnp.bfloat16
    assert 0.05 < float(jnp.std(params["conv"]["kernel"].astype(jnp.float32))) < 0.4
    assert not params["conv"]["bias"].any() and params["norm"]["scale"].all()
    assert common.parse_size("1000x1500") == (1000, 1500)
    assert common.parse_size("256") == (256, 256)


def test_timeit_interleaved_calls_in_turn(bench, monkeypatch):
    """One warm-up round, then one call of each function per round; a function leaves once its
    timed calls add up to more than max_seconds (after at least one)."""
    common = bench("common")
    clock = [0.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])
    calls = []

    def taking(name: str, seconds: float):
        def fn():
            calls.append(name)
            clock[0] += seconds
            return jnp.zeros(())

        return fn

    timings = common.timeit_interleaved(
        {"fast": taking("fast", 1.0), "slow": taking("slow", 3.0)}, repeats=4, max_seconds=5.0
    )
    assert calls == ["fast", "slow"] * 3 + ["fast"] * 2
    assert timings["fast"].times == (1.0,) * 4 and timings["slow"].times == (3.0, 3.0)
    assert timings["slow"].median == 3.0
    single = common.timeit(taking("one", 2.0), repeats=3, warmup=0)
    assert single.times == (2.0,) * 3 and calls[-3:] == ["one"] * 3
