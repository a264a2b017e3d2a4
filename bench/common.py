"""Helpers shared by the benchmark scripts: set-up, timing, memory, matmul peak, child
processes, random parameters, Markdown tables and JSON results.

The scripts import this module as `common` (they run as `python bench/<script>.py`, which puts
bench/ first on sys.path).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mgdn_jax import runtime

CHILD_PREFIX = "BENCH-RESULT "
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# PyTorch's FLOP count of the release's forward pass, MFLOP per output pixel (ARCHITECTURE.md;
# none published for GDSR x16).
RELEASE_MFLOP_PER_PIXEL = {"mff": 0.39, "mef": 1.99, "hdr": 3.97, "gdsr": 0.63}
# Square size of the matmul whose FLOP/s is the machine's peak, per backend.
MATMUL_SIZE = {"cpu": 2048}
DEFAULT_MATMUL_SIZE = 8192


def setup() -> None:
    """The command-line tools' XLA flags (`mgdn_jax.runtime.configure`), without the persistent
    compilation cache, so that compile times are real. Call before the first computation."""
    runtime.configure()
    jax.config.update("jax_enable_compilation_cache", False)


# ----------------------------------------------------------------------------- timing


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per call: the median and minimum of `times` (warm-up calls excluded)."""

    median: float
    min: float
    times: tuple[float, ...]


def timeit(
    fn: Callable[[], Any], repeats: int, warmup: int = 1, max_seconds: float | None = None
) -> Timing:
    """Calls `fn` (whose result is waited for) `warmup` times, then times `repeats` calls, or
    fewer (at least one) once the timed calls add up to more than `max_seconds`."""
    return timeit_interleaved({"fn": fn}, repeats, warmup, max_seconds)["fn"]


def timeit_interleaved(
    fns: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 1,
    max_seconds: float | None = None,
) -> dict[str, Timing]:
    """`timeit` for several functions at once, called in turn (one call of each per round), so
    that a machine whose speed drifts, or a first-run penalty, affects them alike: measured
    one after the other on a 2-core VM, whichever formulation went first was 40-50 % slower.
    A function leaves the rounds once its timed calls add up to more than `max_seconds`."""
    for _ in range(warmup):
        for fn in fns.values():
            jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}

    def wanted(name: str) -> bool:
        done = times[name]
        return len(done) < max(repeats, 1) and (max_seconds is None or sum(done) <= max_seconds)

    while active := [name for name in fns if wanted(name)]:
        for name in active:
            start = time.perf_counter()
            jax.block_until_ready(fns[name]())
            times[name].append(time.perf_counter() - start)
    return {name: Timing(statistics.median(t), min(t), tuple(t)) for name, t in times.items()}


def compile_timed(jitted: Any, *args: Any) -> tuple[Any, float]:
    """(compiled executable, seconds to trace, lower and compile) of a `jax.jit` function.

    Afterwards, as the project's tools do, the compiler's freed memory goes back to the OS
    (`runtime.release_memory`), and the kernel's peak-RSS mark is reset, so that
    `peak_memory` can tell the compilation's peak from the run's."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    elapsed = time.perf_counter() - start
    runtime.release_memory()
    reset_peak_rss()
    return compiled, elapsed


# ----------------------------------------------------------------------------- memory and FLOPs


def compiled_memory(compiled: Any) -> dict[str, float]:
    """XLA's buffer sizes of a compiled executable, in MB: temporaries, arguments, outputs."""
    stats = compiled.memory_analysis()
    return {
        "temp_mb": stats.temp_size_in_bytes / 1e6,
        "argument_mb": stats.argument_size_in_bytes / 1e6,
        "output_mb": stats.output_size_in_bytes / 1e6,
    }


def compiled_flops(compiled: Any) -> float:
    """XLA's FLOP count of a compiled executable (multiply-adds count 2; elementwise ops 1)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per partition
        cost = cost[0]
    return float(cost.get("flops", 0.0))


_EARLIER_PEAK_RSS_MB = [0.0]  # the process's peak RSS before the last `reset_peak_rss`


def _vm_hwm_mb() -> float | None:
    """The kernel's peak-RSS mark (Linux VmHWM, MB), None where /proc is missing."""
    status = Path("/proc/self/status")
    if not status.is_file():
        return None
    for line in status.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


def reset_peak_rss() -> None:
    """Resets the kernel's peak-RSS mark to the current RSS (Linux /proc/self/clear_refs),
    remembering the peak so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    _EARLIER_PEAK_RSS_MB[0] = max(_EARLIER_PEAK_RSS_MB[0], peak)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory() -> dict[str, float]:
    """This process's peak RSS (MB, since it started, compilation included), its peak RSS since
    the last `compile_timed` (the compiled program's runs; Linux only) and, on a GPU, the
    device's peak bytes in use (MB). Peaks only grow, so one configuration per process gives
    per-configuration peaks."""
    since_compile = _vm_hwm_mb()
    current = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peaks = {"peak_rss_mb": max(current, _EARLIER_PEAK_RSS_MB[0])}
    if since_compile is not None and _EARLIER_PEAK_RSS_MB[0]:
        peaks["run_peak_rss_mb"] = since_compile
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        peaks["device_peak_mb"] = stats["peak_bytes_in_use"] / 1e6
    return peaks


# ----------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else `platform.processor()`."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor()


def machine_info() -> dict[str, Any]:
    """Backend, device, CPU count and library versions of this process."""
    device = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "cpu_model": _cpu_model(),
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "jax_version": jax.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "matmul_precision": str(jax.config.jax_default_matmul_precision),
    }


# Matmul peaks by label: (dtype, precision). "float32" and "bfloat16" run at JAX's default
# precision, as the model does (on NVIDIA GPUs since Ampere, float32 matmuls and convolutions
# then use TF32); "float32-highest" is full float32 arithmetic.
PEAKS = {
    "float32": ("float32", None),
    "float32-highest": ("float32", "highest"),
    "bfloat16": ("bfloat16", None),
}


def peak_labels(dtypes: Sequence[str]) -> list[str]:
    """The peaks to measure for compute `dtypes`: each at the default precision and, off CPU
    (where the default already is full float32), float32 at the highest precision too."""
    labels = list(dict.fromkeys(dtypes))
    if jax.default_backend() != "cpu":
        labels.append("float32-highest")
    return labels


def matmul_size(size: int | None = None) -> int:
    """The side of the square matmul whose FLOP/s is the default backend's peak (`size` if
    given)."""
    return size or MATMUL_SIZE.get(jax.default_backend(), DEFAULT_MATMUL_SIZE)


def matmul_call(label: str, n: int) -> Callable[[], jax.Array]:
    """One (n x n) @ (n x n) matmul of random values in the dtype and precision of
    `PEAKS[label]`, compiled on first call: 2 n^3 FLOP a call."""
    dtype, precision = PEAKS[label]
    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.standard_normal((n, n), np.float32), DTYPES[dtype]) for _ in "ab")
    matmul = jax.jit(lambda a, b: jnp.matmul(a, b, precision=precision))
    return lambda: matmul(a, b)


def matmul_peaks(dtypes: Sequence[str], size: int | None = None, repeats: int = 5) -> dict:
    """FLOP/s of one large square (size x size) @ (size x size) matmul per `peak_labels(dtypes)`
    on the default backend: {"matmul_size": n, "matmul_gflops": {label: GFLOP/s}}."""
    n = matmul_size(size)
    gflops = {
        label: 2 * n**3 / timeit(matmul_call(label, n), repeats).median / 1e9
        for label in peak_labels(dtypes)
    }
    return {"matmul_size": n, "matmul_gflops": gflops}


def peak_shares(gflops: float, dtype: str, peaks: dict[str, float]) -> dict[str, float]:
    """`gflops` as a percentage of the same dtype's matmul peak ("peak_pct") and, where measured,
    of the full-float32 peak ("fp32_peak_pct")."""
    shares = {}
    if peaks.get(dtype):
        shares["peak_pct"] = 100 * gflops / peaks[dtype]
    if peaks.get("float32-highest"):
        shares["fp32_peak_pct"] = 100 * gflops / peaks["float32-highest"]
    return shares


def peaks_line(matmul: dict[str, Any]) -> str:
    """'matmul peaks (N² matmul, this run): float32 X, bfloat16 Y GFLOP/s' for a report."""
    peaks = ", ".join(f"{k} {v:.1f}" for k, v in matmul.get("matmul_gflops", {}).items())
    return f"matmul peaks ({matmul.get('matmul_size')}² matmul, this run): {peaks or '—'} GFLOP/s"


def run_spec(spec: dict[str, Any], measure: Callable[[dict[str, Any]], dict]) -> dict[str, Any]:
    """A child's work: the matmul peaks for spec {"matmul": dtypes, "size": n}, else
    `measure(spec)`; with this process's `machine_info`."""
    if "matmul" in spec:
        result = matmul_peaks(spec["matmul"], spec.get("size"))
    else:
        result = measure(spec)
    return {**result, "machine": machine_info()}


# ----------------------------------------------------------------------------- child processes


def child_result(result: dict[str, Any]) -> None:
    """Hands `result` to the parent `run_child` (one marked line on stdout)."""
    print(CHILD_PREFIX + json.dumps(result), flush=True)


def run_child(script: Path, spec: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    """Runs `python script --child JSON(spec)` and returns the dict it hands back with
    `child_result`, or {"status": "skipped (time budget)" | "failed: ..."}."""
    command = [sys.executable, str(script), "--child", json.dumps(spec)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "skipped (time budget)"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(CHILD_PREFIX):
            return json.loads(line[len(CHILD_PREFIX) :])
    if done.returncode < 0:
        return {"status": f"failed: killed by signal {-done.returncode} (out of memory?)"}
    tail = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
    return {"status": f"failed: {tail[0][:200]}"}


def execute(
    script: Path,
    run_one: Callable[[dict[str, Any]], dict[str, Any]],
    spec: dict[str, Any],
    in_process: bool,
    budget: Budget,
) -> dict[str, Any]:
    """`run_one(spec)` in this process, or in a child process running `script` within what is
    left of `budget`; {"status": "skipped (time budget)"} once it is spent."""
    if budget.spent():
        return {"status": "skipped (time budget)"}
    if in_process:
        return run_one(spec)
    return run_child(script, spec, budget.left())


class Budget:
    """Wall-clock seconds left for a benchmark (None: unlimited)."""

    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float | None:
        return None if self.end is None else max(self.end - time.monotonic(), 0.0)

    def spent(self) -> bool:
        left = self.left()
        return left is not None and left <= 0


def add_benchmark_args(parser: argparse.ArgumentParser, name: str) -> None:
    """The options `run_benchmark` reads: --matmul-size, --in-process, --budget-s, --out,
    --name (default `name`) and the hidden --child."""
    parser.add_argument("--matmul-size", type=int, help="default: 2048 on CPU, 8192 else")
    parser.add_argument("--in-process", action="store_true", help="no child processes")
    parser.add_argument("--budget-s", type=float, help="wall-clock limit of the whole run")
    parser.add_argument("--out", type=Path, help="write NAME.json and NAME.md here")
    parser.add_argument("--name", default=name, help="file name of the results")
    parser.add_argument("--child", help=argparse.SUPPRESS)


def run_benchmark(
    script: Path,
    opts: Any,
    measure: Callable[[dict[str, Any]], dict],
    configurations: Callable[[Any], list[dict[str, Any]]],
    derived: Callable[[dict[str, Any], dict[str, float]], dict[str, Any]],
    columns: Sequence[Column],
    markdown: Callable[[dict[str, Any]], str],
    sort_key: Callable[[dict[str, Any]], Any] | None = None,
) -> dict[str, Any]:
    """The `main` of a benchmark whose configurations each run in a child process of `script`
    (or in this one with --in-process): the matmul peaks of `opts.dtypes` first, then
    `measure(spec)` per spec of `configurations(opts)`, each row completed by
    `derived(row, peaks)`, kept sorted by `sort_key` and reported as it finishes. With
    `opts.child` (a child process) it measures that one spec and returns {}. Returns the
    payload {"machine", "settings", "matmul", "rows"}."""

    def run_one(spec: dict[str, Any]) -> dict[str, Any]:
        return run_spec(spec, measure)

    if opts.child:
        child_result(run_one(json.loads(opts.child)))
        return {}
    budget = Budget(opts.budget_s)
    peaks_spec = {"matmul": opts.dtypes, "size": opts.matmul_size}
    matmul = execute(script, run_one, peaks_spec, opts.in_process, budget)
    payload: dict[str, Any] = {
        "machine": matmul.pop("machine", {}),
        "settings": {k: v for k, v in vars(opts).items() if k not in ("out", "name", "child")},
        "matmul": matmul,
        "rows": [],
    }
    print(markdown_table([], columns), flush=True)
    for spec in configurations(opts):
        row = {**spec, **execute(script, run_one, spec, opts.in_process, budget)}
        machine = row.pop("machine", {})
        payload["machine"] = payload["machine"] or machine
        row.update(derived(row, matmul.get("matmul_gflops", {})))
        payload["rows"].append(row)
        if sort_key is not None:
            payload["rows"].sort(key=sort_key)
        report_row(row, columns, opts.out, opts.name, payload, markdown)
    report_final(opts.out, opts.name, payload, markdown)
    return payload


# ----------------------------------------------------------------------------- model parameters


def _leaf_name(path: tuple) -> str:
    names = [key.key for key in path if isinstance(key, jax.tree_util.DictKey)]
    return str(names[-1]) if names else ""


def random_params(abstract: Any, dtype: str = "float32", seed: int = 0) -> Any:
    """Concrete random values for a tree of `jax.ShapeDtypeStruct` parameters, made on the host
    (compiling the model's own initialisers takes minutes on a CPU): kernels ~ N(0, 1/fan_in)
    with fan_in the product of all but the last axis; 1-D `bias` zeros, other 1-D (norm scales,
    temperatures) ones. Speed does not depend on the values."""
    rng = np.random.default_rng(seed)

    def value(path: tuple, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        shape = tuple(leaf.shape)
        if len(shape) > 1:
            array = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
        else:
            array = np.full(shape, 0.0 if _leaf_name(path) == "bias" else 1.0)
        return jnp.asarray(array, DTYPES[dtype])

    return jax.tree_util.tree_map_with_path(value, abstract)


def parse_size(text: str) -> tuple[int, int]:
    """'256' -> (256, 256); '1000x1500' -> (1000, 1500) (height x width)."""
    h, _, w = text.lower().partition("x")
    return int(h), int(w or h)


def size_label(size: Sequence[int]) -> str:
    h, w = size
    return f"{h}²" if h == w else f"{h}×{w}"


# ----------------------------------------------------------------------------- output


@dataclasses.dataclass(frozen=True)
class Column:
    """A Markdown table column: the result key, its header and a format for numbers."""

    key: str
    header: str
    fmt: str = "{:.2f}"

    def cell(self, row: dict[str, Any]) -> str:
        value = row.get(self.key)
        if value is None:
            return "—"
        if isinstance(value, float):
            return self.fmt.format(value)
        return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """A Markdown table of `rows`, one column per `Column` (missing values as —)."""
    lines = [
        "| " + " | ".join(c.header for c in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(c.cell(row) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def machine_line(machine: dict[str, Any]) -> str:
    """One Markdown line naming the machine of a results table."""
    return (
        f"Machine: {machine.get('device_kind', '?')} ({machine.get('backend', '?')}), "
        f"{machine.get('cpu_count', '?')} CPU cores ({machine.get('cpu_model', '?')}), "
        f"jax {machine.get('jax_version', '?')}."
    )


def write_results(out: Path | None, name: str, payload: dict[str, Any], markdown: str) -> None:
    """Writes OUT/NAME.json (payload) and OUT/NAME.md (markdown); nothing without `out`."""
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown + "\n")


def report_row(
    row: dict[str, Any],
    columns: Sequence[Column],
    out: Path | None,
    name: str,
    payload: dict[str, Any],
    markdown: Callable[[dict[str, Any]], str],
) -> None:
    """Prints one finished row as a Markdown table line and rewrites the results so far."""
    print(markdown_table([row], columns).splitlines()[-1], flush=True)
    write_results(out, name, payload, markdown(payload))


def report_final(
    out: Path | None,
    name: str,
    payload: dict[str, Any],
    markdown: Callable[[dict[str, Any]], str],
) -> None:
    """Prints the full Markdown report and writes the final results."""
    text = markdown(payload)
    print(text)
    write_results(out, name, payload, text)


# ----------------------------------------------------------------------------- formulations


# The columns of a `default_vs_best` table.
SUMMARY_COLUMNS = [
    Column("mode", "pass"),
    Column("width", "C"),
    Column("size", "size"),
    Column("default", "default"),
    Column("default_ms", "default ms", "{:.2f}"),
    Column("best_other", "best other"),
    Column("best_other_ms", "its ms", "{:.2f}"),
    Column("slowdown_pct", "default slower by %", "{:+.1f}"),
]


def default_vs_best(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (mode, width, size) of rows {"mode", "width", "size", "formulation", "default",
    "median_s"}: the default's time (the row marked "default"), the fastest other formulation
    and how much slower the default is (percent; negative = faster)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("median_s"):
            groups.setdefault((row["mode"], row["width"], row["size"]), []).append(row)
    out = []
    for (mode, width, size), group in groups.items():
        mine = [r for r in group if r["default"]]
        others = [r for r in group if not r["default"]]
        if not mine or not others:
            continue
        best = min(others, key=lambda r: r["median_s"])
        out.append(
            {
                "mode": mode,
                "width": width,
                "size": size,
                "default": mine[0]["formulation"],
                "default_ms": mine[0]["median_s"] * 1e3,
                "best_other": best["formulation"],
                "best_other_ms": best["median_s"] * 1e3,
                "slowdown_pct": 100 * (mine[0]["median_s"] / best["median_s"] - 1),
            }
        )
    return out


def report_formulations(
    group: Sequence[dict[str, Any]],
    timings: dict[str, Timing],
    modes: Sequence[str],
    payload: dict[str, Any],
    columns: Sequence[Column],
    opts: argparse.Namespace,
    markdown: Callable[[dict[str, Any]], str],
) -> None:
    """Completes and reports the rows of one configuration, one per formulation ({"mode",
    "width", "size", "formulation", "default", ...}): those in `timings` get median_s, times,
    median_ms and status "ok" (the others keep their status), every row a label ("name
    (default)" for the default). They join payload["rows"], kept sorted by (mode as ordered in
    `modes`, width, size), and payload["summary"] follows (`default_vs_best`)."""
    rows = payload["rows"]
    for row in group:
        timing = timings.get(row["formulation"])
        if timing is not None:
            row.update(median_s=timing.median, times=list(timing.times), status="ok")
            row["median_ms"] = timing.median * 1e3
        row["label"] = row["formulation"] + (" (default)" if row["default"] else "")
        rows.append(row)
        rows.sort(key=lambda r: (modes.index(r["mode"]), r["width"], r["size"]))
        payload["summary"] = default_vs_best(rows)
        report_row(row, columns, opts.out, opts.name, payload, markdown)


def verdict(summary: Sequence[dict[str, Any]]) -> str:
    """'worst: +X %; within 10 %: yes|no' over the rows of `default_vs_best`."""
    slowdowns = [s["slowdown_pct"] for s in summary]
    if not slowdowns:
        return "nothing to compare yet"
    worst = max(slowdowns)
    return f"worst: {worst:+.1f} %; within 10 %: {'yes' if worst <= 10 else 'no'}"
