# Sourced by the batch scripts beside it: run a job step so that SLURM's warning before the
# time limit becomes a checkpoint and a requeue, and the requeued job continues the run.
#
#   run_requeueable RUN_DIR COMMAND...      (COMMAND: srun ... tools/slurm/node_launch.sh ...)
#
# The batch script asks for the warning with `#SBATCH --signal=B:USR1@<seconds>` (B: to this
# shell only, so each training process gets it exactly once, from here) and `--requeue`.
# On SIGUSR1 this passes the signal to the step (srun forwards it to its tasks: the launchers,
# which pass it to the training processes); the loop checkpoints at its next log step and exits
# (status 138 = 128 + SIGUSR1; results.json says "interrupted"). Once the step has ended after the
# signal and the run directory holds a checkpoint, the job is requeued with `scontrol requeue`
# (also when the step did not stop in time and the launcher killed it: the requeued job loses
# only the steps since the last checkpoint). The requeued job runs the same command, whose
# `--resume auto` continues from the checkpoint. A step that ends without the signal (finished,
# or failed) ends the job with its own status.
# SCONTROL replaces `scontrol` (tests).

has_checkpoint() {
    # What `--resume auto` continues from.
    [ -f "$1/checkpoint.pt" ]
}

run_requeueable() {
    local run_dir=$1 status=0
    shift
    FASTSSL_STOP_SIGNALLED=0 FASTSSL_STEP_PID=""
    trap 'FASTSSL_STOP_SIGNALLED=1
          echo "$(date -u +%FT%TZ) SIGUSR1 (time limit near): the run checkpoints and stops, then the job is requeued"
          kill -USR1 "$FASTSSL_STEP_PID" 2>/dev/null || true' USR1
    "$@" &
    FASTSSL_STEP_PID=$!
    wait "$FASTSSL_STEP_PID" || status=$?
    while kill -0 "$FASTSSL_STEP_PID" 2>/dev/null; do  # the trap cut `wait` short: the step still runs
        status=0
        wait "$FASTSSL_STEP_PID" || status=$?
    done
    trap - USR1
    echo "$(date -u +%FT%TZ) job step exited with status $status"
    if [ "$FASTSSL_STOP_SIGNALLED" = 1 ] && has_checkpoint "$run_dir"; then
        echo "$(date -u +%FT%TZ) checkpoint in $run_dir: requeueing job ${SLURM_JOB_ID:-?} (it continues with --resume auto)"
        ${SCONTROL:-scontrol} requeue "${SLURM_JOB_ID:?not inside a SLURM job}"
        return 0
    fi
    return "$status"
}
