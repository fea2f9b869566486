#!/usr/bin/env bash
# Every GPU check of a lent-GPU session in one command, most important first, each step under its
# own time limit, so a 15-minute device budget is spent on one call: the limits add up to 580 s,
# inside the tool's 600 s per command.
#
# Before the call, on the development machine (../shared does not travel with the working tree):
#     mkdir -p .gpu_data && cp -r ../shared/data/train .gpu_data/
# then run it through the device tool with carry [".gpu_data"] and timeout_s 600:
#     bash benchmarks/gpu_session.sh
#
# Writes under $OUT (default /tmp/gdq_gpu): session.log (every step's output and time), the
# kernels.py and latency.py JSONs and the latency plot; the device tool brings back 8 files at most.
# Steps: 1 install (builds csrc/cuda), 2 GPU tests (Triton, CUDA C++, CADyQ, integer tail; fixed
# tile configs), 3 per-conv timing, 4 end-to-end latency at 720p/1080p/4K with the profile of the
# integer-tail row. A failing step is logged and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gdq_gpu}
mkdir -p "$OUT"
LOG="$OUT/session.log"
export PYTHONUNBUFFERED=1
PY=python  # `python -m pip`: a bare `pip` on the device machine may belong to another interpreter

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2 start rc
    shift 2
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    echo "=== $name: exit $rc after $(($(date +%s) - start))s" | tee -a "$LOG"
}

{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; git rev-parse --short HEAD; } \
    >>"$LOG" 2>&1
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
    >>"$LOG" 2>&1

CALIB=.gpu_data/train
if [ ! -d "$CALIB" ]; then
    echo "no $CALIB: copy ../shared/data/train there and carry .gpu_data; latency step skipped" | tee -a "$LOG"
fi

step install 180 $PY -m pip install --no-build-isolation --no-deps -e .
step tests 140 env GDQ_TRITON_AUTOTUNE=0 $PY -m pytest -q -p no:cacheprovider tests/test_cuda_kernels.py \
    tests/test_triton_kernels.py tests/test_cadyq.py tests/test_inttail.py
step kernels 90 $PY benchmarks/kernels.py --out "$OUT"
if [ -d "$CALIB" ]; then
    step latency 170 $PY benchmarks/latency.py --gpu --calib "$CALIB" --compile none \
        --output 1280x720,1920x1080,3840x2160 --plot "$OUT/latency.png" --out "$OUT" \
        --profile "static a8 + int8 tail"
fi
echo "=== done $(date -u)" | tee -a "$LOG"
grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed)" "$LOG" | tail -n 20
tail -n 60 "$LOG"  # the latency table is printed last
