#!/usr/bin/env bash
# On a CUDA machine: the tests that need CUDA (pytest -m cuda) and the default-path scoring
# timings on the GPU (benchmarks/bench_scoring_mixed.py --device cuda: this checkout against a
# baseline revision, full test sets at native size), all written to one log.
# Where there is no CUDA device it says so and exits 0 without running anything.
#
#   benchmarks/gpu_check.sh [LOG]
#
# Environment: PYTHON (default: python3), PATCHCORE_DATA (the folder holding casting,
# magnetic_tile and deeppcb; default: the benchmark's own), BASELINE (git revision, default
# main), TRAIN (training images per set, 0 = all; default 0), SETS (default: all three).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=${1:-benchmarks/out/gpu_check-$(date -u +%Y%m%dT%H%M%SZ).log}
mkdir -p "$(dirname "$LOG")"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

if ! command -v "$PY" >/dev/null 2>&1; then
    echo "gpu_check: no $PY on PATH: nothing checked (set PYTHON)"
    exit 0
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False, or no torch):" \
        "nothing checked; run this on a CUDA machine"
    exit 0
fi

status=0
{
    echo "# gpu_check $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo "# load: $(cut -d' ' -f1-3 /proc/loadavg)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
    echo "## tests that need CUDA"
} >"$LOG" 2>&1
"$PY" -m pytest -q -m cuda -p no:cacheprovider tests >>"$LOG" 2>&1 || status=1
echo "## default-path scoring timings on the GPU" >>"$LOG"
data_args=()
[ -n "${PATCHCORE_DATA:-}" ] && data_args=(--data "$PATCHCORE_DATA")
# shellcheck disable=SC2086
"$PY" benchmarks/bench_scoring_mixed.py --device cuda --baseline "${BASELINE:-main}" \
    --train "${TRAIN:-0}" --sets ${SETS:-casting magnetic_tile deeppcb} "${data_args[@]}" \
    >>"$LOG" 2>&1 || status=1
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg); exit $status" >>"$LOG"
echo "gpu_check: log in $LOG (exit $status)"
exit $status
