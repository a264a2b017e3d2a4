#!/usr/bin/env bash
# The three benchmarks on a GPU, within GPU_BENCH_MINUTES (default 5) minutes in all:
#
#     bench/gpu.sh [OUT_DIR]        (default bench/results/gpu-<date>)
#
# Writes filter, model and train_step .md / .json, and all three tables in tables.md, to
# OUT_DIR. Each benchmark has its share of the time (--budget-s, enforced again by `timeout`);
# configurations that do not fit are listed as "skipped (time budget)", so that a longer
# GPU_BENCH_MINUTES measures more of them. Needs JAX with CUDA (jax[cuda12] or jax[cuda13]).
set -euo pipefail
cd "$(dirname "$0")/.."

out="${1:-bench/results/gpu-$(date +%Y-%m-%d-%H%M)}"
minutes="${GPU_BENCH_MINUTES:-5}"

python - <<'EOF'
import sys

import jax

if jax.default_backend() != "gpu":
    sys.exit(
        "bench/gpu.sh needs JAX with a CUDA GPU, but JAX's default backend is "
        f"{jax.default_backend()!r} ({jax.devices()}); install jax[cuda12] or jax[cuda13]."
    )
print(f"GPU: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}")
EOF
mkdir -p "$out"

# Seconds per benchmark: 24 % filter, 34 % model, 28 % training step; the rest covers start-up
# and the `timeout` margins.
budget() { echo $((minutes * 60 * $1 / 100)); }

run() {  # run BUDGET_S SCRIPT ARGS...: one benchmark, stopped after BUDGET_S + 10 s at most
    local seconds=$1 script=$2
    shift 2
    echo "== $script (budget ${seconds} s)"
    timeout --kill-after=5 $((seconds + 10)) \
        python "$script" "$@" --budget-s "$seconds" --out "$out" ||
        echo "warning: $script stopped early (exit $?); its tables hold what it measured" >&2
}

run "$(budget 24)" bench/filter.py --sizes 128 256 512 1024 --widths 30 60 --repeats 10
run "$(budget 34)" bench/model.py --sizes 256 1024 520 --hdr-sizes 1000x1500 --repeats 5
run "$(budget 28)" bench/train_step.py --dtypes float32 bfloat16 --nmi on off --remat off on \
    --repeats 5

for name in filter model train_step; do
    if [[ -f "$out/$name.md" ]]; then
        cat "$out/$name.md"
        echo
    fi
done >"$out/tables.md"
echo "tables written to $out (all three in $out/tables.md)"
