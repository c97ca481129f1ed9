#!/bin/bash
# One node's launcher: README's command (accelerate launch) with this node's rank, run by
# `srun --ntasks-per-node=1` from the batch scripts beside it, so one line serves 1 and N nodes.
#
#   usage (inside a SLURM job): srun --ntasks-per-node=1 tools/slurm/node_launch.sh RECIPE [ARGS...]
#
# Reads SLURM_JOB_NUM_NODES, SLURM_NODEID (the machine rank), MASTER_ADDR (node 0, set by the
# batch script), MASTER_PORT and GPUS_PER_NODE (default: SLURM_GPUS_ON_NODE, else 8). The launch
# settings not given here come from accelerate.yaml beside this script, never from the user's own
# `accelerate config`. LAUNCH replaces `accelerate launch` (e.g. "python -m accelerate.commands.launch");
# FASTSSL_SLURM_DRY_RUN=1 prints the command instead of running it.
#
# Why the two torchrun variables: the launcher (torchrun inside accelerate) dies on a SIGUSR1 it
# does not handle, and its workers with it, before they checkpoint. Told to handle it, it passes
# the signal to the training processes and waits up to TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds
# for them to write the checkpoint and exit; keep it below the --signal lead time.
set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
NODE_RANK=${SLURM_NODEID:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-240}

if [ "$#" -lt 1 ]; then
    echo "error: no recipe given; usage: node_launch.sh recipes/mira_bs512.py [--section.field VALUE ...]" >&2
    exit 2
fi
read -r -a launch <<< "${LAUNCH:-accelerate launch}"
launch+=(--config_file "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/accelerate.yaml" --multi_gpu)
if [ "$NNODES" -gt 1 ]; then
    cmd=("${launch[@]}" --num_processes $((GPUS_PER_NODE * NNODES)) --num_machines "$NNODES"
         --machine_rank "$NODE_RANK" --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" "$@")
else
    cmd=("${launch[@]}" --num_processes "$GPUS_PER_NODE" --num_machines 1 --main_process_port "$MASTER_PORT" "$@")
fi
if [ "${FASTSSL_SLURM_DRY_RUN:-0}" = 1 ]; then
    quoted=$(printf '%q ' "${cmd[@]}")  # as a shell would take it back: an argument with a space stays one
    printf '%s\n' "${quoted% }"
    exit 0
fi
exec "${cmd[@]}"
