# Sourced by the GPU session scripts (gpu_session.sh, gpu_sm90.sh), with LOG set:
# step NAME SECONDS COMMAND... runs COMMAND under a time limit, its output appended to $LOG,
# with a header and its exit status and time; a failing step does not stop the script. With STEPS
# set (names separated by spaces), only the steps it names run: a device call that cannot hold
# them all (10 minutes at most) runs them in parts.
step() {
    local name=$1 limit=$2 start rc
    shift 2
    if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then
        echo "=== $name: skipped (not in STEPS)" | tee -a "$LOG"
        return 0
    fi
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    echo "=== $name: exit $rc after $(($(date +%s) - start))s" | tee -a "$LOG"
}
