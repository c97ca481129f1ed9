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
# signal, unfinished (a status other than 0), and the run wrote a checkpoint during this job, the
# job is requeued with `scontrol requeue` (also when the step did not stop in time and the launcher
# killed it: the requeued job loses only the steps since the last checkpoint). The requeued job
# runs the same command, whose `--resume auto` continues from the checkpoint. A step that ends
# without the signal (finished, or failed), or that finished (status 0) although the signal came
# during its last moments, ends the job with its own status.
# SCONTROL replaces `scontrol` (tests).

refuse_run_dir_override() {
    # The batch scripts' RUN_DIR is where requeueing looks for this job's checkpoint: a
    # --train.run_dir among the overrides would send the run elsewhere and silently end the
    # requeueing at the first time limit, and so would a RUN_DIR with {time} (a new folder at
    # every start, without the checkpoint).
    local arg
    case "${RUN_DIR:-}" in
        *"{time}"*)
            echo "error: RUN_DIR=$RUN_DIR names a new folder at every start ({time}): a requeued job would not" \
                 "find its checkpoint; give a fixed one, e.g. RUN_DIR=runs/mira_bs512_$(date +%F)" >&2
            exit 2 ;;
    esac
    for arg in "$@"; do
        case "$arg" in
            --train.run_dir|--train.run_dir=*)
                echo "error: give the run directory as RUN_DIR=... before sbatch, not as $arg: the job" \
                     "requeues itself by watching RUN_DIR" >&2
                exit 2 ;;
        esac
    done
}

saved_since() {
    # The run wrote the checkpoint `--resume auto` continues from during this job (newer than
    # the marker file $2): requeueing a job that saved nothing would only repeat it forever.
    [ -f "$1/checkpoint.pt" ] && [ "$1/checkpoint.pt" -nt "$2" ]
}

run_requeueable() {
    local run_dir=$1 status=0 started
    shift
    started=$(mktemp)
    touch -d '-1 second' "$started"  # a checkpoint written from now on is newer than it
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
    if [ "$FASTSSL_STOP_SIGNALLED" = 1 ] && [ "$status" != 0 ] && saved_since "$run_dir" "$started"; then
        rm -f "$started"
        echo "$(date -u +%FT%TZ) checkpoint in $run_dir: requeueing job ${SLURM_JOB_ID:-?} (it continues with --resume auto)"
        if ! ${SCONTROL:-scontrol} requeue "${SLURM_JOB_ID:?not inside a SLURM job}"; then
            echo "$(date -u +%FT%TZ) error: scontrol requeue failed (above); the run is checkpointed in $run_dir:" \
                 "submit the same sbatch command again and it continues there (--resume auto)" >&2
            return 1
        fi
        return 0
    fi
    rm -f "$started"
    if [ "$FASTSSL_STOP_SIGNALLED" = 1 ] && [ "$status" = 0 ]; then
        echo "$(date -u +%FT%TZ) not requeued: the run finished"
    elif [ "$FASTSSL_STOP_SIGNALLED" = 1 ]; then
        echo "$(date -u +%FT%TZ) not requeued: the run wrote no checkpoint in $run_dir during this job" >&2
    fi
    return "$status"
}
