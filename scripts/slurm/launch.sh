#!/usr/bin/env bash
# The one entry point of every Slurm recipe: an sbatch file runs it once per node with
#
#   srun --ntasks-per-node=1 scripts/slurm/launch.sh --config ... --load ... [train flags]
#
# and it starts torchrun on that node; its arguments go to the Python module unchanged.
#
# From the allocation:  NNODES = SLURM_NNODES, NODE_RANK = SLURM_NODEID,
#                       MASTER_ADDR = first host of SLURM_JOB_NODELIST,
#                       MASTER_PORT = 10000 + SLURM_JOB_ID % 50000 (two jobs sharing a node differ).
# Environment (optional):
#   NPROC_PER_NODE   processes per node; default SLURM_GPUS_ON_NODE, else 8.
#                    CPU runs set it (e.g. to SLURM_NTASKS on one node).
#   LAUNCH_MODULE    Python module to run (default router_upcycling.train), or a script path ending in .py.
#   PYTHON           interpreter; default the repository's .venv/bin/python when present, else python3.
#   MASTER_ADDR, MASTER_PORT   override the values derived from the allocation.
#   REQUEUE_ON_USR1  1 (default): after a SIGUSR1, node 0 requeues the job once torchrun has exited.
#
# Preemption and time limits. The sbatch files ask for `--signal=USR1@180 --requeue`: 180 s before
# the time limit slurmstepd sends SIGUSR1 to every process of the step (this script, torchrun and
# each training process; checked on slurm-wlm 22.05). The training processes catch it, save a
# checkpoint and exit. torchrun (torch 2.13) handles only SIGTERM, SIGINT, SIGHUP and SIGQUIT by
# default, and SIGUSR1's default action would kill it, orphaning the ranks mid-save; adding SIGUSR1
# to --signals-to-handle would make it tear the ranks down after --shutdown-timeout. So torchrun is
# started with SIGUSR1 ignored (the training processes install their own handler, which replaces
# the inherited "ignore"): it waits for its ranks to finish saving and exits normally. This script
# notes the signal and, on node 0, requeues the job; the requeued job resumes from --load.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

: "${SLURM_JOB_ID:?launch.sh runs inside a Slurm job step: start it with srun from an sbatch file}"
: "${SLURM_JOB_NODELIST:?SLURM_JOB_NODELIST is not set: start launch.sh with srun}"
: "${SLURM_NNODES:?SLURM_NNODES is not set: start launch.sh with srun}"
: "${SLURM_NODEID:?SLURM_NODEID is not set: start launch.sh with srun}"

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then
        PYTHON="$REPO_ROOT/.venv/bin/python"
    else
        PYTHON="python3"
    fi
fi
MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)}"
MASTER_PORT="${MASTER_PORT:-$((10000 + SLURM_JOB_ID % 50000))}"
NNODES="$SLURM_NNODES"
NODE_RANK="$SLURM_NODEID"
NPROC_PER_NODE="${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
LAUNCH_MODULE="${LAUNCH_MODULE:-router_upcycling.train}"
REQUEUE_ON_USR1="${REQUEUE_ON_USR1:-1}"
if [[ "$LAUNCH_MODULE" == *.py ]]; then target=("$LAUNCH_MODULE"); else target=(-m "$LAUNCH_MODULE"); fi

echo "== launch.sh | job ${SLURM_JOB_ID} (${SLURM_JOB_NAME:-?}) restart ${SLURM_RESTART_COUNT:-0}" \
     "| node ${NODE_RANK}/${NNODES} $(hostname) | ${NPROC_PER_NODE} processes" \
     "| master ${MASTER_ADDR}:${MASTER_PORT} | python ${target[*]} | $(date -Is)"

got_usr1=0
trap 'got_usr1=1; echo "== launch.sh | node ${NODE_RANK}: SIGUSR1 received, waiting for the ranks to save and exit"' USR1

(
    trap '' USR1
    exec "$PYTHON" -m torch.distributed.run \
        --nnodes="$NNODES" \
        --node-rank="$NODE_RANK" \
        --nproc-per-node="$NPROC_PER_NODE" \
        --master-addr="$MASTER_ADDR" \
        --master-port="$MASTER_PORT" \
        "${target[@]}" "$@"
) &
torchrun_pid=$!

# A trapped signal interrupts `wait` (status > 128) while torchrun keeps running: wait again.
status=0
while true; do
    wait "$torchrun_pid" && status=0 || status=$?
    kill -0 "$torchrun_pid" 2>/dev/null || break
done

echo "== launch.sh | node ${NODE_RANK}: torchrun exited with status ${status} | $(date -Is)"
if ((got_usr1)) && [[ "$REQUEUE_ON_USR1" == 1 && "$NODE_RANK" == 0 ]]; then
    echo "== launch.sh | requeueing job ${SLURM_JOB_ID}; it resumes from its last checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
