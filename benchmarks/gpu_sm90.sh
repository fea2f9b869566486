#!/usr/bin/env bash
# One device call for the Gluon body conv (kernels/body_conv_sm90.py) on an H100 / H200:
#
#     bash benchmarks/gpu_sm90.sh        # its GPU tests (bit-exact against the flat kernel and the
#                                        # reference), then kernels.py --sm90: both kernels on the
#                                        # same inputs in one run, and its ring depth x programs per SM
#     bash benchmarks/gpu_sm90.sh e2e    # the 1080p latency of static a8 + int8 tail (image graph)
#                                        # with the tenth run's defaults and with today's, two
#                                        # processes each (RUNS: other switches)
#
# No install: the package from the working tree (kernels/ linked where setup.py maps it; no C++
# extension). e2e needs the calibration images: mkdir -p .gpu_data && cp -r ../shared/data/train
# .gpu_data/ before the call, and carry [".gpu_data"]. Writes $OUT/session.log and the JSONs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gdq_gpu}
mkdir -p "$OUT"
LOG="$OUT/session.log"
export PYTHONUNBUFFERED=1 TRITON_CACHE_AUTOTUNING=1

# shellcheck source=benchmarks/gpu_step.sh
. benchmarks/gpu_step.sh  # step NAME SECONDS COMMAND...

ln -sfn ../kernels gdq_engine/kernels
export PYTHONPATH=$PWD
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; git rev-parse --short HEAD
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } >>"$LOG" 2>&1

if [ "${1:-}" = e2e ]; then
    ROWS="fp16 CL;static a8 + int8 tail, image graph"
    # each run its own process; its first letter the body convs' kernel and switches: 0 the flat
    # kernel, 1 the first-built Gluon kernel, w its warp-specialized twin with none of what the tenth
    # and eleventh runs turned on (the defaults up to the ninth run), c the twin with its conversions
    # by adds (and the flat convs'), h the twin reading halo boxes, s the twin with the conversions by
    # adds, the saturating codes and the upsampler's convs (the flat convs' too); n the defaults (the
    # twin with halo boxes, the conversions by adds, the upsampler's convs, the fp16 stream by TMA and
    # the saturating codes but on the fp16 stream), p the tenth run's defaults (n without the last
    # two), r the defaults with the fp16 stream by TMA (the eleventh run's: off then), t the defaults
    # with the saturating codes on every conv, u with both
    off="GDQ_SM90_HALO=0 GDQ_SM90_CVT_ADD=0 GDQ_CVT_ADD=0 GDQ_SM90_CVT_SAT=0 GDQ_CVT_SAT=0 GDQ_SM90_UP=0"
    off="$off GDQ_SM90_TMA_RES=0"
    for run in ${RUNS:-pa na pb nb}; do
        case ${run:0:1} in
            0) vars="GDQ_SM90_BODY=0 $off" ;;
            1) vars="GDQ_SM90_BODY=1 GDQ_SM90_WS=0 $off" ;;
            w) vars="GDQ_SM90_BODY=1 GDQ_SM90_WS=1 $off" ;;
            c) vars="GDQ_SM90_BODY=1 GDQ_SM90_WS=1 $off GDQ_SM90_CVT_ADD=1 GDQ_CVT_ADD=1" ;;
            h) vars="GDQ_SM90_BODY=1 GDQ_SM90_WS=1 $off GDQ_SM90_HALO=1" ;;
            s) vars="GDQ_SM90_BODY=1 GDQ_SM90_WS=1 $off GDQ_SM90_CVT_ADD=1 GDQ_CVT_ADD=1 GDQ_SM90_CVT_SAT=1 GDQ_CVT_SAT=1"
               vars="$vars GDQ_SM90_UP=1" ;;
            n) vars="GDQ_SM90_BODY=1" ;;
            p) vars="GDQ_SM90_BODY=1 GDQ_SM90_TMA_RES=0 GDQ_SM90_CVT_SAT=0" ;;
            r) vars="GDQ_SM90_BODY=1 GDQ_SM90_TMA_RES=1" ;;
            t) vars="GDQ_SM90_BODY=1 GDQ_SM90_CVT_SAT=1" ;;
            u) vars="GDQ_SM90_BODY=1 GDQ_SM90_TMA_RES=1 GDQ_SM90_CVT_SAT=1" ;;
            *) echo "unknown run $run" | tee -a "$LOG"; continue ;;
        esac
        # shellcheck disable=SC2086  # vars: one word per assignment (env keeps the last of a name)
        step "latency_sm90_$run" ${LIMIT:-100} env $vars python benchmarks/latency.py --gpu \
            --calib .gpu_data/train --compile none --output 1920x1080 --rows "$ROWS" --out "$OUT/e2e$run"
    done
elif [ "${1:-}" = 2 ]; then
    # the second call, most telling first: tests_persistent (the twin with several tiles a program,
    # as the engine runs it: each program refills its ring, code box and residual box across tiles;
    # the tenth run's tests gave most programs one tile), tests_defaults (every GPU test of the Gluon
    # conv, the integer tail, the image graphs, the Triton kernels and RDN's dense blocks on the
    # defaults as they are now, about 1,000 tests; with PYTEST_N=12 for its limit), kernels.py --sm90
    # (both kernels' rows, the A/B switches in interleaved rounds, each default undone), kernels_picked
    # (kernels.py --sm90 again with the switches that won those rounds on), tests_picked (the GPU
    # tests with those switches on together), then the bit-exact tests of each switch on its own:
    # tests_new (the fp16 stream by TMA, halo boxes, the conversions by adds, the flat kernel's too),
    # tests_sat (the saturating codes, the twin's and the flat kernel's), tests_up (the twin's
    # upsampler convs), tests_knobs (the knobs, and the bit-exact ones of conv1 and of conv2 + next
    # codes on the fp16 stream; not the compile checks); then Nsight Compute on conv1 and conv2
    # (fp16 stream) on both kernels, the Gluon one as the engine runs it unless NCU_SM90 says (the
    # first 6 matching launches compile; the next 6 are profiled), and on the twin reading halo boxes
    # (NCU_HALO); last, the Gluon kernel's stall samples per SASS instruction (its conv1 and conv2 on
    # the fp16 stream; NCU_SM90=4,2,1,1,1,1: with halo boxes and the adds, as the engine runs it).
    # The tests print a line per test (-v), so a call cut short still says which passed. The limits
    # add up to over 30 minutes, more than the 15 of a session: run it in parts, with STEPS.
    # PYTEST_N=12 runs the tests on 12 pytest-xdist workers (compiling in parallel; the device image has
    # pytest-xdist): the tests check bits, not time, so sharing the GPU does them no harm.
    step tests_persistent 120 env GDQ_TRITON_AUTOTUNE=0 python -m pytest -v -p no:cacheprovider -rf --tb=short \
        ${PYTEST_N:+-n $PYTEST_N} tests/test_body_conv_sm90.py -k "persistent_programs"
    step tests_defaults 240 env GDQ_TRITON_AUTOTUNE=0 python -m pytest -v -p no:cacheprovider -rf --tb=short \
        ${PYTEST_N:+-n $PYTEST_N} tests/test_body_conv_sm90.py tests/test_inttail.py tests/test_imagegraph.py \
        tests/test_triton_kernels.py tests/test_densebody.py -k "not compiles"
    # kernels.py --sm90, then issue 4's targets on its rows (benchmarks/targets.py: the engine's rows)
    step kernels_sm90 330 sh -c 'python benchmarks/kernels.py --sm90 --out "$1" &&
        python benchmarks/targets.py "$1"/kernels-sm90-*.json' _ "$OUT"
    # kernels.py --sm90 again with the A/B switches that won its interleaved rounds turned on
    # (benchmarks/pick_switches.py on that JSON: this call's, or PICK_FROM's, e.g. a committed one
    # carried in the tree), and issue 4's targets on its rows; nothing when no switch won
    step kernels_picked 330 sh -c 'vars=$(python benchmarks/pick_switches.py ${PICK_FROM:-"$1"/kernels-sm90-*.json}) ||
        exit 1
        [ -n "$vars" ] || { echo "no switch won"; exit 0; }
        echo "switches: $vars"
        mkdir -p "$1/picked" && echo "$vars" > "$1/picked/switches" &&
        env $vars python benchmarks/kernels.py --sm90 --out "$1/picked" &&
        python benchmarks/targets.py "$1"/picked/kernels-sm90-*.json' _ "$OUT"
    # the bit-exact GPU tests of the Gluon conv, the integer tail and the image graphs with the
    # switches kernels_picked turned on (its $OUT/picked/switches) as the engine's defaults: every
    # launch the engine makes, with the winners together, before any of them becomes a default
    step tests_picked 200 sh -c '[ -s "$1/picked/switches" ] || { echo "no switches picked"; exit 0; }
        vars=$(cat "$1/picked/switches") && echo "switches: $vars" &&
        env $vars GDQ_TRITON_AUTOTUNE=0 python -m pytest -v -p no:cacheprovider -rf --tb=short ${2:+-n "$2"} \
            tests/test_body_conv_sm90.py tests/test_inttail.py tests/test_imagegraph.py -k "not compiles"' \
        _ "$OUT" "${PYTEST_N:-}"
    step tests_new 360 env GDQ_TRITON_AUTOTUNE=0 python -m pytest -v -p no:cacheprovider -rf --tb=short ${PYTEST_N:+-n $PYTEST_N} \
        tests/test_body_conv_sm90.py tests/test_triton_kernels.py::test_flat_conv_conversions_by_adds_give_the_same_bits \
        -k "by_adds or by_tma or (halo and not compile)"
    step tests_sat 180 env GDQ_TRITON_AUTOTUNE=0 python -m pytest -v -p no:cacheprovider -rf --tb=short ${PYTEST_N:+-n $PYTEST_N} \
        tests/test_body_conv_sm90.py tests/test_triton_kernels.py::test_flat_conv_saturating_codes_give_the_same_bits \
        -k "saturating"
    step tests_up 150 env GDQ_TRITON_AUTOTUNE=0 python -m pytest -v -p no:cacheprovider -rf --tb=short ${PYTEST_N:+-n $PYTEST_N} \
        tests/test_body_conv_sm90.py -k "upsampler_convs or applies"
    step tests_knobs 200 env GDQ_TRITON_AUTOTUNE=0 python -m pytest -q -x -p no:cacheprovider -rf --tb=short ${PYTEST_N:+-n $PYTEST_N} \
        tests/test_body_conv_sm90.py -k "knobs or skips or applies or (equals and (conv1 or fp16))"
    step ncu 110 sh -c 'ncu --clock-control none --kernel-name regex:"_packed_conv3x3|_body_conv_sm90" \
        --launch-skip 6 --launch-count 6 --section SpeedOfLight --section ComputeWorkloadAnalysis \
        --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section Occupancy \
        --section LaunchStats --csv --page details python benchmarks/ncu_convs.py --sm90 ${NCU_SM90:-4,2,1,1,1,1} > "$1"' _ \
        "$OUT/ncu-sm90.csv"
    step ncu_halo 70 sh -c 'ncu --clock-control none --kernel-name regex:"_body_conv_sm90" --launch-skip 2 \
        --launch-count 2 --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
        --section SchedulerStats --section Occupancy --csv --page details \
        python benchmarks/ncu_convs.py --sm90 ${NCU_HALO:-4,2,1,1,1} > "$1"' _ "$OUT/ncu-sm90-halo.csv"
    step ncu_sass 90 sh -c 'ncu --clock-control none --kernel-name regex:"_body_conv_sm90" --launch-skip 2 \
        --launch-count 2 --section WarpStateStats --section SourceCounters --import-source yes --page source \
        --print-source sass --csv python benchmarks/ncu_convs.py --sm90 ${NCU_SM90:-4,2,1,1,1,1} > "$1"' _ \
        "$OUT/ncu-sm90-sass.csv"
    # Last, for a call with time left (both need .gpu_data, as e2e does): RDN-B x2 at 1080p, its
    # dense blocks on the Triton kernels (untrained weights: the times are what counts; each conv
    # one launch over its segments against the segment chain, kernels/dense_conv.py), and the
    # CLI's bench on the shipped EDSR-baseline x4 (fp16 FP layers), the speed a user measures.
    step rdn 240 python benchmarks/latency.py --gpu --arch rdn --scale 2 --calib .gpu_data/train --compile none \
        --output 1920x1080 --frames 2 --reps 10 --out "$OUT" \
        --rows "fp16 CL;static a8;static a8, segment chain;static a4;entropy {2,4,8};static a8 + int8 tail, image graph"
    step bench_cli 120 python -m gdq_engine bench --input .gpu_data/train --policies fp static:8 granular \
        --tail-bits 8 --dtype float16 --json "$OUT/bench-cli-gpu.json"
else
    step tests 170 env GDQ_TRITON_AUTOTUNE=0 python -m pytest -q -x -p no:cacheprovider -rf --tb=short \
        tests/test_body_conv_sm90.py -k "not compiles"
    step kernels_sm90 250 sh -c 'python benchmarks/kernels.py --sm90 --out "$1" &&
        python benchmarks/targets.py "$1"/kernels-sm90-*.json' _ "$OUT"
fi
rm -f gdq_engine/kernels
echo "=== done $(date -u)" | tee -a "$LOG"
grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed)|^=== |sm90|^conv|^issue 4|^switches|^no switch" "$LOG" | grep -v " PASSED" | tail -n 60
