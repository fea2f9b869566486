#!/usr/bin/env bash
# Every GPU check of a lent-GPU session in two device calls, most important first, each step under
# its own time limit. The device budget is 15 minutes in all, the machine's start (about 35 s) and
# each call's transfers included, so call 1's limits add up to 450 s and call 2's to 320 s.
#
#     bash benchmarks/gpu_session.sh      # call 1: install, the image-graph and engine-graph tests,
#                                         # latency at 1080p (the rows that decide defaults)
#     bash benchmarks/gpu_session.sh 2    # call 2, on the still-warm machine (30 s idle window):
#                                         # those rows again at 1080p, at 720p and 4K, then every row
#     bash benchmarks/gpu_session.sh 3    # instead of 2 when the kernels changed: kernels.py, Nsight Compute
#     GDQ_KERNEL_TESTS=1 bash benchmarks/gpu_session.sh   # call 1 with the CUDA C++ tests (csrc changed)
#     bash benchmarks/gpu_session.sh stage  # alone, on a fresh machine with about 5 minutes left: no
#                                           # install; the policy-stage kernels' tests and 1080p latency
#
# Why the 1080p latency twice: a machine's first process times the same code slower than a second
# one (static a8 + int8 tail: 2.70 ms in the first process of the sixth H100 run, 2026-11-27, 2.41 ms
# in its second; 2.99 and 2.53 ms on the fourth run), while the kernels time the same in both
# (kernels.py, fourth and fifth runs, within 1%). The second process, with Triton's kernels and
# autotuning cached on disk by the first, also runs faster. latency.py's rounds (rows called in
# turn, with the host's share of each call) and its A/B pairs compare rows within one process; the
# load log (top processes every 15 s) shows what else used the host.
#
# Steps and times on the sixth run (H100, at aef90c3; benchmarks/results/gpu-session-*-run6*.log):
# install 68 s; the CUDA tests passed (3 + 87) but their steps ran out their 20 and 50 s limits
# (the interpreter's start and exit on a cold machine: 7-8 s more than pytest's own count); the
# new tests 34 s; latency at 1080p was cut short after 13 of 19 rows at 250 s cold, and took 85 s
# for all 19 in the second process; the Triton tests passed as far as they got in 95 s; 720p/4K was
# cut short in 4K at 80 s. Hence: both calls time the rows that decide defaults first (--rows), the
# second call every row last, and the Triton tests (kernels unchanged since the fifth run, where
# all passed) moved to call 3. On the seventh run (at 4919a34): install 58 s, the new tests 41 s,
# the engines' graph tests 41 s, latency at 1080p 137 s cold (5 rows, 4 profiles), 28 s in the
# second process; 720p/4K 35 s; every row cut after 18 at 120 s. Its stage call (no install) took
# 236 s on a fresh machine, the tests cut at 60 s.
#
# Before the first call, on the development machine (../shared does not travel with the working tree):
#     mkdir -p .gpu_data && cp -r ../shared/data/train .gpu_data/
# then run each call through the device tool with carry [".gpu_data"] (timeout_s 480 and 340).
#
# Writes under $OUT (default /tmp/gdq_gpu): session.log (every step's output and time), load.log,
# a/ (call 1: the 1080p latency JSON and plot, with the profiles of the decisive rows) and
# b/ (call 2: the second 1080p JSON, its traces in traces.tgz, the 720p/4K JSON and the every-row one;
# call 3: the kernels.py JSON and ncu-convs.csv); the device tool brings back 8 files at most, 2 folders down. Each pytest run
# is its own process, so a crash in one loses only that step.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gdq_gpu}
mkdir -p "$OUT"
LOG="$OUT/session.log"
export PYTHONUNBUFFERED=1
# Triton keeps autotuning results on disk, so later steps reuse what earlier ones tuned (same kernel
# source, configs and tuning key): kernels.py takes latency.py's 1080p picks, and the 720p/4K run
# uses them too instead of tuning again at its first frame size. The machine is fresh every session.
export TRITON_CACHE_AUTOTUNING=1
PY=python  # `python -m pip`: a bare `pip` on the device machine may belong to another interpreter

# shellcheck source=benchmarks/gpu_step.sh
. benchmarks/gpu_step.sh  # step NAME SECONDS COMMAND...

{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; git rev-parse --short HEAD; } \
    >>"$LOG" 2>&1
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
    >>"$LOG" 2>&1

CALIB=.gpu_data/train
if [ ! -d "$CALIB" ]; then
    echo "no $CALIB: copy ../shared/data/train there and carry .gpu_data; latency steps skipped" | tee -a "$LOG"
fi
PYTEST="$PY -m pytest -q -p no:cacheprovider -rf --tb=short"

# the rows that decide defaults (image graphs, static and Granular-DQ) and their anchor; fp32 comes along
DECISIVE="fp16 CL;static a8 + int8 tail;static a8 + int8 tail, image graph;granular {2,4,8} + int8 tail"
DECISIVE="$DECISIVE;granular {2,4,8} + int8 tail, image graph"
PROFILES=(--profile "static a8 + int8 tail" --profile "static a8 + int8 tail, image graph"
          --profile "granular {2,4,8} + int8 tail" --profile "granular {2,4,8} + int8 tail, image graph")
# what else runs on the host while latency.py times (load average and the busiest processes), and the
# clocks: the GPU's SM and memory clocks, performance state, power and temperature, and the host cores'
# MHz (a first process slower than a second could be either side's clocks)
sample_load() {
    while true; do
        { date -u +%T; top -b -n 1 -w 120 | head -n 14
          nvidia-smi --query-gpu=clocks.sm,clocks.mem,pstate,power.draw,temperature.gpu --format=csv,noheader
          grep -m 4 MHz /proc/cpuinfo; } >>"$OUT/load.log" 2>&1
        sleep 15
    done
}
# latency.py names its JSON latency-<device>-<date>.json: give call 2's a name of its own before the
# next run writes the same name (the seventh run's 720p/4K JSON was lost that way: a glob matched two files)
name_latest() {
    local f
    for f in "$OUT"/b/latency-*-20*.json; do [ -e "$f" ] && mv "$f" "$OUT/b/$1"; done
}
sample_load &
SAMPLER=$!
trap 'kill $SAMPLER 2>/dev/null' EXIT

if [ "${1:-1}" = stage ]; then
    # one call without the install (a fresh machine, little device time left): the package from the
    # working tree (kernels/ linked where setup.py maps it; no C++ extension: the Triton backend),
    # the policy stage's kernels and the dynamic image graphs tested, then the decisive rows at
    # 1080p with the Granular-DQ profiles, in two processes
    ln -sfn ../kernels gdq_engine/kernels
    export PYTHONPATH=$PWD
    step stage_tests 85 env GDQ_TRITON_AUTOTUNE=0 $PYTEST tests/test_policy_kernels.py tests/test_granular.py \
        tests/test_imagegraph.py
    if [ -d "$CALIB" ]; then
        mkdir -p "$OUT/a" "$OUT/b"
        for run in a b; do
            step "latency_1080p_$run" $([ $run = a ] && echo 150 || echo 55) $PY benchmarks/latency.py --gpu \
                --calib "$CALIB" --compile none --output 1920x1080 --rows "$DECISIVE" --out "$OUT/$run" \
                --profile "granular {2,4,8} + int8 tail" --profile "granular {2,4,8} + int8 tail, image graph"
        done
    fi
    rm -f gdq_engine/kernels
    echo "=== done $(date -u)" | tee -a "$LOG"
    grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed)|^=== " "$LOG" | tail -n 40
    exit 0
fi

if [ "${1:-1}" = 3 ]; then
    mkdir -p "$OUT/b"
    step kernels 145 $PY benchmarks/kernels.py --out "$OUT/b"
    # Nsight Compute's sections of conv1, conv2, the upsampler, the FP last conv and conv2 on the
    # fp16 stream (ncu's own messages land in the CSV's first lines)
    step ncu 45 sh -c 'ncu --clock-control none --kernel-name regex:"_packed_conv3x3|_fp_conv3x3" \
        --launch-skip 5 --launch-count 5 --section SpeedOfLight --section ComputeWorkloadAnalysis \
        --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section Occupancy \
        --section LaunchStats --csv --page details python benchmarks/ncu_convs.py > "$1"' _ "$OUT/b/ncu-convs.csv"
    # the Triton tests (all passed on the fifth run; cold, 58 of them took 90 s on the fourth)
    step triton_tests 100 env GDQ_TRITON_AUTOTUNE=0 $PYTEST --durations=12 tests/test_stitch.py \
        tests/test_lastconv.py tests/test_triton_kernels.py tests/test_cadyq.py tests/test_inttail.py
    echo "=== done $(date -u)" | tee -a "$LOG"
    grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed)|^=== " "$LOG" | tail -n 40
    exit 0
fi

if [ "${1:-1}" = 2 ]; then
    mkdir -p "$OUT/b"
    if [ -d "$CALIB" ]; then  # the second process: the decisive rows warm from call 1's disk cache
        step latency_1080p_again 100 $PY benchmarks/latency.py --gpu --calib "$CALIB" --compile none \
            --output 1920x1080 --rows "$DECISIVE" --out "$OUT/b" --trace "$OUT/b" "${PROFILES[@]}"
        name_latest latency-1080p.json
        tar czf "$OUT/b/traces.tgz" -C "$OUT/b" $(cd "$OUT/b" && ls trace-*.json) && rm -f "$OUT/b/"trace-*.json
        step latency_720p_4k 100 $PY benchmarks/latency.py --gpu --calib "$CALIB" --compile none \
            --output 1280x720,3840x2160 --reps 10 --rows "$DECISIVE" --out "$OUT/b"  # a 4K round takes 0.3 s
        name_latest latency-720p-4k.json
        # every row (most compile here, cold: cut short is fine, the sixth run has them all warm)
        step latency_1080p_all 120 $PY benchmarks/latency.py --gpu --calib "$CALIB" --compile none \
            --output 1920x1080 --out "$OUT/b"
    fi
    echo "=== done $(date -u)" | tee -a "$LOG"
    grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed)|^=== " "$LOG" | tail -n 40
    exit 0
fi

step install 80 $PY -m pip install --no-build-isolation --no-deps -e .
if [ "${GDQ_KERNEL_TESTS:-0}" = 1 ]; then  # the CUDA C++ kernels (unchanged since aef90c3, where all passed)
    step cuda_errors 30 env GDQ_TRITON_AUTOTUNE=0 $PYTEST tests/test_cuda_kernels.py tests/test_cpu_kernels.py \
        tests/test_engine.py -k "bad_shapes or links_the_shared or bad_cuda_input"
    step cuda_tests 60 env GDQ_TRITON_AUTOTUNE=0 $PYTEST tests/test_cuda_kernels.py -k "not bad_shapes"
fi
if [ "${GDQ_MEMCHECK:-0}" = 1 ]; then
    # compute-sanitizer's memcheck on 9 small CUDA C++ tests (re-quantized and residual epilogues at
    # each width, pack/unpack, an odd shape): out-of-bounds or misaligned accesses exit 99 (issue 5;
    # 0 errors on the fourth 2026-11-26 run)
    SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
    SMALL="(relu_requantize and (4-True-8 or 2-False-2)) or (residual_fp32 and 1.0)"
    SMALL="$SMALL or (quantize_pack_and_unpack and True) or (odd_shapes and shape1-4)"
    step memcheck 40 env GDQ_TRITON_AUTOTUNE=0 "$SANITIZER" --tool memcheck --error-exitcode 99 $PYTEST \
        tests/test_cuda_kernels.py -k "$SMALL"
fi
# what no GPU has run yet: a dynamic policy's image graphs (runtime/imagegraph.py's stage graph and
# width patterns), image graphs as the static default (the engines' graph tests below), and
# latency.sync_sites' stacks (the sixth run's unexplained sync at __init__.py:1270)
step new_tests 110 env GDQ_TRITON_AUTOTUNE=0 $PYTEST tests/test_imagegraph.py tests/test_hostreads.py \
    tests/test_policy_kernels.py
step engine_graph_tests 60 env GDQ_TRITON_AUTOTUNE=0 $PYTEST tests/test_triton_kernels.py tests/test_lastconv.py \
    -k "cuda_graph or fp16_last_conv_kernel_is_close"
if [ -d "$CALIB" ]; then
    mkdir -p "$OUT/a"
    step latency_1080p 200 $PY benchmarks/latency.py --gpu --calib "$CALIB" --compile none --output 1920x1080 \
        --rows "$DECISIVE" --plot "$OUT/a/latency.png" --out "$OUT/a" "${PROFILES[@]}"
fi
echo "=== done $(date -u)" | tee -a "$LOG"
grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed)|^=== " "$LOG" | tail -n 40
